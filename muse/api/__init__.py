"""HTTP APIs: native JSON, OpenAI- and AUTOMATIC1111-compatible, OpenAPI, and the middleware they share."""
