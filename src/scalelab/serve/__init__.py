"""scalelab.serve: serve a trained run — continuous batching with a KV cache, int8 quantization, response
and prefix caches, Prometheus metrics — and distil a teacher run into a smaller student.

Modules, one concern each:
  loading     a run directory → model (newest verified safetensors checkpoint) + tokenizer
  kvcache     the KV slot pool and `extend`, the cached forward built from the model's own modules
  sampling    per-request greedy / temperature / top-k sampling with the request's own generator
  engine      synchronous continuous batching: admit (batched prefill), decode, finish, score
  scheduler   the bounded queue and the engine thread (max_batch, max_wait_ms, max_queue)
  cache       byte-bounded LRU caches: responses and prompt-prefix KV
  metrics     Prometheus text exposition
  quantize    int8 (dynamic on CPU, weight-only on GPU), size and held-out loss report
  server      InferenceServer: all of the above behind async generate/score (no HTTP)
  app         FastAPI routes + uvicorn (the `serve` extra; import lazily)
  distill     distillation through the trainer, with a from-scratch baseline
  commands    `scalelab serve`, `scalelab distill`
"""
