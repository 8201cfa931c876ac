"""`longserve bench ppl` on the demo model: perplexity through the server's prompt log-probabilities stays flat
with DCA past the training length (512) and climbs without it."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from longserve.bench import ppl

ROOT = Path(__file__).resolve().parents[1]


def test_perplexities_of_a_window():
    lps = [None, math.log(0.5), math.log(0.5), math.log(0.25), math.log(0.25)]
    whole, tail = ppl.perplexities(lps)
    assert whole == pytest.approx(2 ** 1.5) and tail == pytest.approx(4.0)
    with pytest.raises(ValueError):
        ppl.perplexities([None])


def test_dca_stays_flat_past_the_training_length_where_plain_rope_climbs(tmp_path):
    parser = argparse.ArgumentParser()
    ppl.add_arguments(parser)
    args = parser.parse_args(["--model", str(ROOT / "models/demo-passkey"), "--lengths", "256,1024",
                              "--modes", "dca,no-dca", "--out", str(tmp_path)])
    assert ppl.run(args) == 0
    results = json.loads((tmp_path / "ppl.json").read_text())["results"]
    dca, plain = results["dca"], results["no-dca"]
    assert dca["256"]["ppl"] == pytest.approx(plain["256"]["ppl"], rel=1e-4)   # inside 512 DCA is plain RoPE
    assert dca["1024"]["tail_ppl"] < 1.25 * dca["256"]["tail_ppl"]               # flat past the training length
    # climbs without DCA (1.45x here; the stage-5 model reads 2T without DCA better than the stage-4 one did)
    assert plain["1024"]["tail_ppl"] > 1.3 * dca["1024"]["tail_ppl"]
    assert (tmp_path / "ppl.md").read_text().startswith("| length |")
    assert (tmp_path / "ppl.png").stat().st_size > 0
