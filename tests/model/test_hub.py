"""Model arguments → local paths: repo ids found in a fake Hugging Face cache, never downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.generation_config import generation_defaults
from model.hub import is_local_path, resolve_model_path
from tests.conftest import build_hf_cache

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A checkpoint-shaped folder (resolution only looks at file names)."""
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_paths_are_not_repo_ids(tmp_path: Path) -> None:
    assert is_local_path(str(tmp_path)) and is_local_path("/no/such/dir")
    assert is_local_path("./model") and is_local_path("model.gguf")
    assert not is_local_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert resolve_model_path("/no/such/dir") == "/no/such/dir"  # the loader names it later


def test_repo_id_resolves_to_its_snapshot(tmp_path: Path, source: Path) -> None:
    main = build_hf_cache(tmp_path / "hf", "org/tiny", source, commit="1" * 40)
    old = build_hf_cache(tmp_path / "hf", "org/tiny", source, commit="2" * 40, ref=None)
    cache = str(tmp_path / "hf" / "hub")
    assert resolve_model_path("org/tiny", download_dir=cache) == str(main)
    assert resolve_model_path("org/tiny", revision="2" * 40, download_dir=cache) == str(old)


def test_hf_home_is_the_default_cache(tmp_path: Path, source: Path, monkeypatch) -> None:
    import huggingface_hub.constants as constants

    snapshot = build_hf_cache(tmp_path / "hf", "org/tiny", source)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    assert resolve_model_path("org/tiny") == str(snapshot)


def test_missing_repo_names_where_it_looked(tmp_path: Path, source: Path) -> None:
    build_hf_cache(tmp_path / "hf", "org/tiny", source)
    cache = str(tmp_path / "hf" / "hub")
    with pytest.raises(FileNotFoundError) as info:
        resolve_model_path("org/absent", download_dir=cache)
    msg = str(info.value)
    assert "org/absent" in msg and f"{cache}/models--org--absent" in msg and "main" in msg
    with pytest.raises(FileNotFoundError, match="revision v9"):
        resolve_model_path("org/tiny", revision="v9", download_dir=cache)
    with pytest.raises(ValueError, match="neither an existing path nor"):
        resolve_model_path("org/a/b/c", download_dir=cache)


def test_gguf_only_snapshot_is_its_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "m.Q4_0.gguf").write_bytes(b"")
    snapshot = build_hf_cache(tmp_path / "hf", "org/g", src)
    cache = str(tmp_path / "hf" / "hub")
    assert resolve_model_path("org/g", download_dir=cache) == str(snapshot / "m.Q4_0.gguf")
    (src / "m.Q8_0.gguf").write_bytes(b"")
    build_hf_cache(tmp_path / "hf", "org/g", src)
    with pytest.raises(ValueError, match="several GGUF files"):
        resolve_model_path("org/g", download_dir=cache)


def write_generation_config(folder: Path, **values) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generation_config.json").write_text(json.dumps(values))
    return folder


def test_generation_config_modes(tmp_path: Path) -> None:
    model = write_generation_config(
        tmp_path / "m", temperature=0.6, top_p=0.9, top_k=20, max_new_tokens=7, do_sample=True,
        bos_token_id=1,  # not a sampling field
    )  # fmt: skip
    assert generation_defaults("auto", str(model)) == {
        "temperature": 0.6, "top_k": 20, "top_p": 0.9, "max_tokens": 7,
    }  # fmt: skip
    assert generation_defaults("vllm", str(model)) == {}
    other = write_generation_config(tmp_path / "other", min_p=0.1)
    assert generation_defaults(str(other), str(model)) == {"min_p": 0.1}
    assert generation_defaults("auto", str(tmp_path / "x.gguf")) == {}
    merged = generation_defaults("vllm", str(model), {"temperature": 0.5})
    assert merged == {"temperature": 0.5}
    with pytest.raises(ValueError, match=r"unknown fields \['temprature'\]"):
        generation_defaults("auto", str(model), {"temprature": 0.5})
    with pytest.raises(FileNotFoundError, match="generation_config.json"):
        generation_defaults(str(tmp_path / "nowhere"), str(model))
