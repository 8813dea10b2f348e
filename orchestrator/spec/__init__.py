"""The job spec: its schema (schema.py) and how it is read, overridden and reported (loading.py)."""
