"""The compiler passes, in pipeline order: masks -> analysis -> condense (rules) -> capture -> rewrite."""
