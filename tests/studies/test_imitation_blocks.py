"""bench/imitation_blocks.py: ablations of separate teachers kept as blocks, then combined."""
import importlib.util
import json
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "imitation_blocks.py"
spec = importlib.util.spec_from_file_location("imitation_blocks", SCRIPT)
blocks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(blocks)

REFS = [f"the {w} cat sat on the mat number {i} today" for i, w in enumerate(["red", "big", "old", "shy"] * 10)]


def degrade(lines, every):
    """Every `every`-th sentence loses its last three words: a worse system."""
    return [" ".join(s.split()[:-3]) if i % every == 0 else s for i, s in enumerate(lines)]


def fake_ablation(root: Path, seed: int, systems: dict[str, list[str]], scores: dict[str, float],
                  lambda2: float = 0.001) -> Path:
    """An ablate dir as `imitate-orch ablate` leaves it: ablation.json and each run's test hypotheses."""
    out = root / f"block{seed}-lambda2={lambda2}" / "toy-ablate"
    variants = {}
    for name, hyps in systems.items():
        rd = out / name
        (rd / "evaluate").mkdir(parents=True)
        for decoder in ("nat", "lpd"):
            (rd / "evaluate" / f"test.{decoder}.txt").write_text("".join(h + "\n" for h in hyps))
        run = {"seed": seed, "run_dir": str(rd), "valid": {"nat": 1.0, "lpd": 2.0},
               "test": {"nat": scores[name], "lpd": scores[name] + 1}, "test_chrf": {"nat": 3.0, "lpd": 4.0}}
        variants[name] = {**run, "imitation": name.endswith("-imitation"), "runs": [run]}
    result = {"job": "toy", "lambda2": lambda2, "il_reduction": "mean", "delta_t": 3, "beam": 4,
              "valid_sentences": 10, "test_sentences": len(REFS), "test_at": 30.0 + seed, "variants": variants}
    (out / "ablation.json").write_text(json.dumps(result))
    (out / "ablation.md").write_text("table\n")
    return out


def combine_toy(tmp_path: Path, records: Path) -> tuple[str, dict[str, list[str]]]:
    """combine over REFS: the table, and its steps as {"a → b": [adds, Δ, p, wins]}."""
    refs = tmp_path / "test.de"
    refs.write_text("".join(r + "\n" for r in REFS))
    table = blocks.combine(records, refs, "13a", 200)
    return table, {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:6]]
                   for line in table.splitlines() if "→" in line}


def test_saved_blocks_combine_into_means_and_paired_tests(tmp_path):
    records = tmp_path / "records"
    for seed, (soft, imitation) in {2: (20.0, 22.0), 3: (21.0, 25.0)}.items():
        systems = {"distilled-soft": degrade(REFS, 2), "distilled-soft-imitation": degrade(REFS, 5)}
        out = blocks.save(fake_ablation(tmp_path, seed, systems, {"distilled-soft": soft,
                                                                   "distilled-soft-imitation": imitation}),
                          f"seed{seed}", records)
        assert out == records / f"seed{seed}"
        # What a block keeps: scores, provenance and gzipped hypotheses, nothing pointing at the workdir.
        meta = json.loads((out / "block.json").read_text())
        assert meta["test_at"] == 30.0 + seed and meta["commit"] and meta["cpu"]
        assert "run_dir" not in json.dumps(meta)
        gz = out / blocks.hyp_name("distilled-soft", seed, "nat")
        assert blocks.read_gz(gz) == systems["distilled-soft"]
        first = gz.read_bytes()
        time.sleep(1.1)                     # gzip headers hold a time in seconds
        blocks.save(out.parent.parent / f"block{seed}-lambda2=0.001" / "toy-ablate", f"seed{seed}", records)
        assert gz.read_bytes() == first     # saved again: the same bytes, no spurious diff to commit
    refs = tmp_path / "test.de"
    refs.write_text("".join(r + "\n" for r in REFS))
    table = blocks.combine(records, refs, "13a", 200)
    assert "| 3 | distilled-soft | – | 20.00 | 21.00 | 20.50 ± 0.71 |" in table
    assert "| 6 | distilled-soft-imitation | – | 22.00 | 25.00 | 23.50 ± 2.12 |" in table
    assert "| 7 | distilled-soft-imitation | yes | 23.00 | 26.00 | 24.50 ± 2.12 |" in table
    assert "AT teacher of each block, test BLEU (beam 4): 32.00, 33.00" in table
    # 3 -> 6: the mean of the scores' changes; p on the hypotheses, where row 6 loses words in
    # 1 sentence of 5 and row 3 in 1 of 2, in every block.
    step = next(line for line in table.splitlines() if line.startswith("| 3 → 6 |"))
    assert [c.strip() for c in step.split("|")[3:6]] == ["+3.00", "0.000 (2)", "2/2"]
    # A step whose rows were not run (row 8) is left out, not reported as zero.
    assert "| 3 → 8 |" not in table and "| 8 → 6 |" not in table


def test_combine_refuses_references_of_another_length(tmp_path):
    records = tmp_path / "records"
    blocks.save(fake_ablation(tmp_path, 2, {"distilled-soft": REFS, "distilled-soft-imitation": REFS},
                              {"distilled-soft": 1.0, "distilled-soft-imitation": 1.0}), "seed2", records)
    refs = tmp_path / "short.de"
    refs.write_text("one line\n")
    with pytest.raises(SystemExit, match="has 1 lines"):
        blocks.combine(records, refs, "13a", 10)
    with pytest.raises(SystemExit, match="no blocks"):
        blocks.combine(tmp_path / "empty", refs, "13a", 10)


def test_blocks_with_other_rows_or_scores_only_combine_over_what_each_has(tmp_path):
    """A block that did not run a row shows "–" there and leaves the row's mean to the others; a
    block kept with scores only (no hypotheses) counts in the means and BLEU changes, not in
    the paired bootstrap, and a step only such blocks have gets no p."""
    records = tmp_path / "records"
    good, bad = REFS, degrade(REFS, 2)
    blocks.save(fake_ablation(tmp_path, 2, {"distilled-soft": bad, "distilled-soft-imitation": good,
                                            "distilled-uniform": bad},
                              {"distilled-soft": 20.0, "distilled-soft-imitation": 24.0, "distilled-uniform": 19.0}),
                "seed2", records)
    blocks.save(fake_ablation(tmp_path, 3, {"distilled-soft": bad, "distilled-soft-imitation": good},
                              {"distilled-soft": 21.0, "distilled-soft-imitation": 23.0}), "seed3", records)
    nat = {"distilled-soft": 22.0, "distilled-soft-imitation": 21.0, "distilled-soft-modules": 20.0}
    scores_only = {"block": "seed1", "beam": 4, "test_at": 31.0, "hypotheses": False, "variants": {
        name: [{"seed": 1, "test": {"nat": bleu, "lpd": bleu + 1}}] for name, bleu in nat.items()}}
    (records / "seed1").mkdir()
    (records / "seed1" / "block.json").write_text(json.dumps(scores_only))
    table, steps = combine_toy(tmp_path, records)
    assert "| 2 | distilled-uniform | – | – | 19.00 | – | 19.00 |" in table
    assert "| 3 | distilled-soft | – | 22.00 | 20.00 | 21.00 | 21.00 ± 1.00 |" in table
    # 3 -> 6: changes -1, +4, +2 over three runs; the bootstrap over the two with hypotheses.
    delta, p, wins = steps["3 → 6"][1:]
    assert (delta, wins) == ("+1.67", "2/3") and p.endswith("(2)") and float(p.split()[0]) == 0.0
    assert steps["2 → 3"][1:] == ["+1.00", "1.000 (1)", "1/1"]   # the same hypotheses: never better
    assert steps["3 → 8"][1:] == ["-2.00", "–", "0/1"]   # row 8 only in the scores-only block
    assert "| 2 → 5 |" not in table                  # row 5 in no block


def test_a_row_at_another_lambda2_joins_its_block_beside_the_blocks_own(tmp_path):
    """save --only adds a variant trained later on the same teacher; an imitation variant at
    another λ2 is kept beside the block's row (VARIANT@lambda2=X), and combine gives it its own
    rows and steps: against the module-free row, and against the block's λ2."""
    records = tmp_path / "records"
    systems = {"distilled-soft": degrade(REFS, 2), "distilled-soft-imitation": degrade(REFS, 3)}
    for seed in (2, 3):
        blocks.save(fake_ablation(tmp_path, seed, systems, {"distilled-soft": 20.0 + seed,
                                                              "distilled-soft-imitation": 21.0 + seed}),
                    f"seed{seed}", records)
        later = fake_ablation(tmp_path, seed, {**systems, "distilled-soft-imitation": REFS},
                              {"distilled-soft": 20.0 + seed, "distilled-soft-imitation": 24.0 + seed}, lambda2=1.0)
        blocks.save(later, f"seed{seed}", records, only=["distilled-soft-imitation"])
    meta = json.loads((records / "seed2" / "block.json").read_text())
    assert sorted(meta["variants"]) == ["distilled-soft", "distilled-soft-imitation",
                                        "distilled-soft-imitation@lambda2=1"]
    assert meta["lambda2"] == 0.001 and meta["added"][0]["variants"] == ["distilled-soft-imitation"]
    assert blocks.read_gz(records / "seed2" / blocks.hyp_name("distilled-soft-imitation@lambda2=1", 2, "nat")) == REFS
    assert (records / "seed2" / "ablation.lambda2=1.md").is_file()
    table, steps = combine_toy(tmp_path, records)
    assert "| 6 | distilled-soft-imitation | – | 23.00 | 24.00 | 23.50 ± 0.71 |" in table
    assert "| 6 (λ2 = 1) | distilled-soft-imitation@lambda2=1 | – | 26.00 | 27.00 | 26.50 ± 0.71 |" in table
    assert steps["3 → 6 (λ2 = 1)"] == ["imitation (modules and L_IL), λ2 = 1", "+4.00", "0.000 (2)", "2/2"]
    assert steps["6 → 6 (λ2 = 1)"] == ["λ2 0.001 → 1", "+3.00", "0.000 (2)", "2/2"]
    assert steps["6 (λ2 = 1) → 7 (λ2 = 1)"][1:] == ["+1.00", "1.000 (2)", "2/2"]  # the same hypotheses
    assert steps["3 → 6"][1] == "+1.00"          # the block's own rows are unchanged
    # Another teacher's ablation, or a variant it does not have, is refused before anything is written.
    other = fake_ablation(tmp_path / "other", 2, systems, {"distilled-soft": 1.0, "distilled-soft-imitation": 1.0},
                          lambda2=0.1)
    result = json.loads((other / "ablation.json").read_text())
    (other / "ablation.json").write_text(json.dumps({**result, "test_at": 99.0}))
    with pytest.raises(SystemExit, match="another teacher"):
        blocks.save(other, "seed2", records, only=["distilled-soft-imitation"])
    with pytest.raises(SystemExit, match="has no"):
        blocks.save(other, "seed2", records, only=["distilled-soft-modules"])
    seed3 = (records / "seed3" / "block.json").read_text()
    with pytest.raises(SystemExit, match="pass --only"):   # saving anew would drop the λ2 = 1 row
        blocks.save(later, "seed3", records)
    assert (records / "seed3" / "block.json").read_text() == seed3
    assert json.loads((records / "seed2" / "block.json").read_text()) == meta
