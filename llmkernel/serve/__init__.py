"""`llmk serve`: an OpenAI-compatible HTTP server for any model folder the other stages write."""
