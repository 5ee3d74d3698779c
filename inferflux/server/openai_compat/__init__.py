"""The OpenAI wire format: request bodies and response encoders over the generation layer's events.

Two dialects speak it: OpenAI's `/v1/*` (`server/openai/`) and LM Studio's `/api/v0/*`
(`server/lmstudio/`), which is the same format plus `stats`, `model_info` and `runtime` fields.
Neither dialect imports the other; both call `chat_response`, `completion_response` and
`embedding_response` here with their own extra fields.
"""
