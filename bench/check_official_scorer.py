"""Our evaluation vs the official allenai/aokvqa scorer (evaluation/eval_predictions.py, run as a subprocess) on
the same predictions files: full shards, a truncated shard, a --max-samples subset.

40 synthetic questions with A-OKVQA-like answers (varied direct answers, some difficult), shards of 10, a tiny
untrained model whose answers are scripted (tests/test_eval_expected.py), so the figures are non-trivial.

  python bench/check_official_scorer.py /path/to/allenai/aokvqa   # a checkout of github.com/allenai/aokvqa
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main(argv=None) -> int:
    official = Path((argv or sys.argv[1:])[0]).resolve()
    import torch

    import test_eval_expected as T
    from conftest import TINY_TEXTS
    from mmcoconut.config import load_config
    from mmcoconut.data.sharding import write_shards
    from mmcoconut.data.sources import SyntheticImage, WorkItem
    from mmcoconut.factory import build_image_processor, build_model, build_tokenizer
    from mmcoconut.tiny_models import make_tiny_models

    tmp = Path(tempfile.mkdtemp(prefix="official_"))
    dirs = make_tiny_models(tmp / "tiny", "test", texts=TINY_TEXTS)
    recs = T.official_records(40)
    write_shards([WorkItem(r["question_id"], r, SyntheticImage(r["scene"])) for r in recs], tmp / "shards", "val",
                 maxcount=10, image_size=32, progress=False)
    cfg = load_config(data={"model": {"lm_id": dirs["lm"], "vision_id": dirs["vision"], "image_tokens": "patches",
                                      "vision_layer": -1, "new_token_init": "", "max_length": 256},
                            "data": {"num_workers": 0}, "eval": {"batch_size": 4, "max_new_tokens": 5},
                            "logging": {"report_to": "none"}})
    torch.manual_seed(0)
    tok = build_tokenizer(cfg.model)
    tiny = (build_model(cfg.model, tok).eval(), tok, build_image_processor(cfg.model), cfg)
    T.truncate_last_shard(tmp / "shards", tmp / "trunc", keep_samples=3)  # val-000003.tar keeps 3 of 10
    ann = tmp / "ann"
    ann.mkdir()
    for name, spec, kw, dataset in [("full", tmp / "shards" / "val", {}, recs),
                                    ("truncated", tmp / "trunc" / "val", {}, recs),
                                    ("subset-25", tmp / "shards" / "val", {"max_samples": 25}, recs[:25])]:
        res, _ = T.run_eval(tiny, str(spec), tmp / name, **kw)
        (ann / "aokvqa_v1p0_val.json").write_text(json.dumps(dataset))
        out = subprocess.run([sys.executable, "evaluation/eval_predictions.py", "--aokvqa-dir", str(ann), "--split",
                              "val", "--preds", str(tmp / name / "predictions_nocot.json")], cwd=official,
                             env={"PYTHONPATH": str(official)}, capture_output=True, text=True, check=True).stdout
        off = " | ".join(line.split(" ", 1)[1] for line in out.splitlines())
        print(f"{name}: mmcoconut MC {res['mc']:.4f} DA {res['da']:.4f} (expected {res['n_expected']}, scored "
              f"{res['n_scored']}, missing {res['missing'] or 'none'}) | official: {off}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
