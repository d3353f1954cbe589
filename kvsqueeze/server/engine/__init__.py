"""The serving engine: continuous batching, admission by cache bytes, reuse of compressed prefixes."""
