"""Pydantic request and response shapes only, one file per API: completions, chat, responses,
anthropic (/v1/messages), pooling (embeddings, rerank, score) and models (models, tokenize);
base holds what they share and sampling the fields completions and chat share."""
