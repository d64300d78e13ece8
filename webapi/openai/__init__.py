"""OpenAI compatibility: Files, Batches and (streaming) completions, for the official clients."""
