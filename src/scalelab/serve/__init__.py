"""scalelab.serve: serve a trained run — continuous batching with a KV cache, int8/int4 quantization,
response and prefix caches, Prometheus metrics, native and OpenAI-compatible HTTP routes — and distil a
teacher run into a smaller student.

Modules, one concern each:
  loading     a run directory → model (newest verified safetensors checkpoint) + tokenizer
  families    per-family KV-cache adapters (gpt2, llama: RoPE, GQA) over the model's own modules
  kvcache     the KV slot pool, `extend` (the cached forward) and `forward_last` (cache-less, any model)
  sampling    per-request greedy / temperature / top-k / top-p sampling with the request's own generator
  text        stop strings, the text a stream may send so far, which tokens a text covers (logprobs)
  engine      synchronous continuous batching: admit (batched prefill), decode, finish, score
  scheduler   the bounded queue, burst-aware admission and the engine thread
  cache       byte-bounded LRU caches: responses and prompt-prefix KV
  metrics     prometheus_client series in a per-server registry, labelled by route template
  quantize    int8 (torchao weight-only) and group-wise int4, size and held-out loss report
  server      InferenceServer: all of the above behind async generate/score (no HTTP)
  validation  request field types (valid Unicode, finite numbers) and JSON-safe validation errors
  httputil    disconnect signal, Retry-After, route-template label (shared by both route modules)
  openai      OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (SSE)
  app         FastAPI routes + uvicorn (the `serve` extra; import lazily)
  distill     distillation through the trainer, with a from-scratch baseline
  commands    `scalelab serve`, `scalelab distill`
"""
