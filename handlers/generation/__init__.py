"""Profile generators: the deterministic rules generator and the LLM generator."""
