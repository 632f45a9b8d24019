"""Console scripts (pyproject [project.scripts]): mmcoconut-export, mmcoconut-ask, mmcoconut-predict here;
mmcoconut-train (mmcoconut.train), mmcoconut-eval (mmcoconut.eval), mmcoconut-shard (tools/make_shards.py)."""
