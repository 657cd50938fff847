"""psc.app: command lines only. Each parses, calls a pipeline, and reports."""
