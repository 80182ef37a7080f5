"""OpenAI-compatible HTTP server over AsyncLLM (FastAPI + uvicorn): `cogvlm2 serve --model DIR_OR_PRESET`.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics.

Modules, by job:
  protocol    request schemas (pydantic), the OpenAI error shape, request -> SamplingParams
  formatting  engine outputs -> OpenAI response and stream-chunk JSON (usage, logprobs)
  media       image URLs -> PIL images (data: URLs, file:// under --allowed-local-media-path)
  serving     one request's lifecycle: body, engine request, deadline, SSE stream, disconnects
  api_server  the FastAPI app, API-key middleware, error handlers, `run_server`
  settings    ServerSettings (the `serve` flags the HTTP layer reads)
Chat messages become CogVLM2's query, history and image in cogvlm2/chat.py (no HTTP there).

Choices where the OpenAI API and CogVLM2 differ:
  * One image per conversation (CogVLM2 puts it before all text): more image parts -> 400 `too_many_images`.
    Images come as `data:image/...;base64,` URLs or, only under --allowed-local-media-path, `file://` paths;
    http(s) URLs are refused (the server never fetches remote URLs).
  * Messages: optional system (or developer) messages first, then user/assistant turns alternating and ending with
    a user turn. Earlier (user, assistant) pairs become CogVLM2 history. System text is prepended, with a newline,
    to the first user question, since CogVLM2's template has no system slot.
  * /v1/completions takes one text prompt and uses the "base" template (the prompt as is); /v1/chat/completions
    uses the model's chat template. max_tokens defaults to 16 for completions (as OpenAI) and to the rest of the
    context for chat; a max_tokens above max_model_len is refused with 400.
  * vLLM's extra sampling fields are accepted too: top_k, min_p, repetition_penalty, min_tokens, ignore_eos,
    stop_token_ids, skip_special_tokens, include_stop_str_in_output, allowed_token_ids, bad_words; and OpenAI's
    logit_bias.
  * Structured outputs: `response_format` (`json_object`, `json_schema`), vLLM's `structured_outputs` ({json,
    regex, choice, grammar, json_object}) and its older `guided_json` / `guided_regex` / `guided_choice` /
    `guided_grammar`; one constraint per request (engine/structured_outputs.py).
  * No field is silently ignored: an unknown field, or one this server does not implement (tools, tool_choice,
    suffix, ...: protocol.UNSUPPORTED_FIELDS), is a 400 `unsupported_field` naming it.
  * Status codes: malformed JSON -> 400 `invalid_json`; a body that does not match the schema (wrong types,
    missing fields) -> 400 `invalid_type`; a well-typed but invalid value (bad image, temperature < 0, ...) -> 400;
    missing or wrong API key -> 401; unknown model or route -> 404; body too large -> 413; timed out, shut down or
    crashed engine -> 503. Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}; in a stream
    that has started, an error arrives as a `data: {"error": ...}` event before `data: [DONE]`.
  * A client that disconnects (streaming or not) aborts its request, which frees its KV blocks.
"""
