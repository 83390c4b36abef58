"""`tokenmill worker` and the multi-host flags: parsing, torchrun's variables, refusals (exit 2)."""

from __future__ import annotations

import pytest

from server.cli import configs, main, make_parser

pytestmark = pytest.mark.timeout(30)


def test_flags_reach_the_engine_config() -> None:
    args = make_parser().parse_args(
        ["worker", "m", "-tp", "4", "--nnodes", "2", "--node-rank", "1", "--master-addr",
         "10.0.0.1", "--master-port", "29500", "--distributed-timeout", "7.5"]
    )  # fmt: skip
    cfg, _ = configs(args)
    assert (args.command, cfg.tensor_parallel_size, cfg.nnodes, cfg.node_rank) == (
        "worker",
        4,
        2,
        1,
    )
    assert (cfg.master_addr, cfg.master_port, cfg.distributed_timeout) == ("10.0.0.1", 29500, 7.5)


def test_torchrun_variables_are_the_defaults(monkeypatch) -> None:
    env = {"MASTER_ADDR": "head", "MASTER_PORT": "1234", "WORLD_SIZE": "3", "RANK": "2"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg, _ = configs(make_parser().parse_args(["serve", "m", "--node-rank", "0"]))
    assert (cfg.master_addr, cfg.master_port, cfg.nnodes, cfg.node_rank) == ("head", 1234, 3, 0)
    cfg, _ = configs(make_parser().parse_args(["worker", "m"]))
    assert cfg.node_rank == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["worker", "m", "--nnodes", "2", "--node-rank", "0"], "node rank 0 is the head"),
        (
            ["serve", "m", "--nnodes", "2", "--node-rank", "1"],
            "node rank 1 runs `tokenmill worker`",
        ),
    ],
)
def test_wrong_command_for_the_node_rank_exits_2(argv, message, capsys) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_one_process_per_host_under_torchrun(monkeypatch, capsys) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main(["worker", "m", "--nnodes", "2", "--node-rank", "1"]) == 2
    assert "torchrun --nproc-per-node 1" in capsys.readouterr().err
