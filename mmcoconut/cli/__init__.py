"""Console scripts (pyproject [project.scripts]), one module each: train (mmcoconut-train), eval (mmcoconut-eval),
shard (mmcoconut-shard), export (mmcoconut-export), ask (mmcoconut-ask), predict (mmcoconut-predict)."""
