"""Online reranking: Ray Serve deployment, FastAPI routes, batching engine."""
