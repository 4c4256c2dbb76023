"""Pipeline stages: one module per stage, each plain logic over one task (see mert_pipeline.executor)."""
