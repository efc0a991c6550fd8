"""The benchmarks still run end to end (tiny sizes; nothing here is timed or compared)."""

import pytest

from hyrank.pipeline.cli import main


@pytest.mark.parametrize("argv", [
    ["bench", "dedup", "--batch-size", "4", "--seq-len", "50", "--dim", "8", "--num-embeddings", "1000",
     "--repeats", "1", "--devices", "cpu"],
    ["bench", "reader", "--rows", "1200", "--long-len", "50", "--batch-size", "200", "--repeats", "1"],
    ["bench", "async", "--rows-per-day", "2500", "--set", "data.batch_size_per_rank=128",
     "--set", "model.options.hidden=[16]", "--seeds", "2", "--set", "train.allreduce_delay_compensation=0",
     "--set", "train.allreduce_weight_prediction=0"],
    ["bench", "async", "--rows-per-day", "2500", "--set", "data.batch_size_per_rank=128",
     "--set", "model.options.hidden=[16]", "--set", "train.allreduce_sync_steps=2"],  # ~10 steps: most async
    ["bench", "overlap", "--config", "jobs/configs/hyformer.toml", "--batch-size", "16", "--steps", "2",
     "--warmup", "1", "--rounds", "1"],
    ["bench", "model", "--models", "dlrm_mlp,hyformer", "--batch-size", "4", "--steps", "1", "--compare",
     "--autocast", "bf16"],  # train.autocast's bf16 rows beside the fp32 ones
    ["bench", "seqlen", "--models", "hyformer,longer_rankmixer", "--lengths", "16,32", "--batch-size", "2", "--steps", "1"],
    ["bench", "days", "--small-days", "6", "--rows-per-day", "60", "--set", "data.batch_size_per_rank=16",
     "--set", "model.options.hidden=[16]", "--set", "features.sequences.0.max_len=16"],
    ["bench", "e2e", "--rows", "1500", "--set", "data.batch_size_per_rank=64", "--models", "hyformer", "--set", "features.sequences.0.max_len=16"],
    ["bench", "torchrec", "--num-embeddings", "500", "--batch-size", "32", "--steps", "3", "--warmup", "1",
     "--rounds", "1", "--profile", "2"],
    ["bench", "tables", "--sizes", "20000", "--steps", "4", "--set", "data.batch_size_per_rank=32",
     "--set", "model.options.hidden=[16]", "--set", "features.sequences.0.max_len=16"],
], ids=["dedup", "reader", "async_plain_2_seeds", "async_default", "overlap", "model", "seqlen", "days", "e2e",
        "torchrec", "tables"])
def test_bench_runs(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("\n") >= 3, out
    if "async" in argv and "--seeds" not in argv:  # default.toml corrects for the delay: plain rule beside it
        assert "async (sync steps 2, prediction 1, compensation 0.5)" in out and "plain stale - sync" in out, out
    if "overlap" in argv:  # every mode ran, and each one's gradients were checked reduced (or not, for local)
        assert all(m in out for m in ("local (no", "sync (plain", "async (stale", "async, plain")), out
    if "model" in argv:  # both towers, fp32 and bf16 rows, against the fp32 and bf16 matmul peaks of the same turns
        assert "default shapes, batch 4" in out and "of fp32 mm" in out and "of bf16 mm" in out, out
        table = out.split('{"bench"')[0]
        assert all(f"{m} {v} " in " ".join(table.split()) for m in ("dlrm_mlp", "hyformer")
                   for v in ("reference", "eager", "eager-bf16"))
    if "tables" in argv:  # the shipped size and the one asked for, each measured against its plan
        assert "as shipped" in out and "item 20,000 rows" in out and "rows/s" in out, out
    if "seqlen" in argv:  # each length, then 2x width and 2x depth, per tower
        table = out.split('{"bench"')[0]
        assert table.count("2x width") == 2 and table.count("L=32 ") == 2, out
        import json

        rows = json.loads(out[out.index('{"bench"'):].splitlines()[0])["rows"]
        for model in ("hyformer", "longer_rankmixer"):  # the wider tower is wider: its d_model was really doubled
            params = {r["variant"]: r["params"] for r in rows if r["model"] == model}
            assert params["L=16, 2x width"] > params["L=16"], params
    if "days" in argv:  # the same rows trained both ways, the small days in one unit
        assert "small days / big day: training" in out and "6 small days" in out, out
    if "e2e" in argv:  # the trainer and the reader alone over the same rows, and the input-wait share
        assert "train/reader" in out and "input wait under 5%" in out and '"reader_rows": 1500' in out, out
        import json

        (r,) = json.loads(out[out.index('{"bench"'):].splitlines()[0])["results"].values()
        assert 0 <= r["loader_wait_share"] <= r["input_wait_share"] < 1, r  # the loader's part of the wait
    if "torchrec" in argv:  # both sides, both settings
        assert "in memory" in out and "from parquet" in out and '"torchrec from parquet"' in out, out
        import json

        record = json.loads(out[out.index('{"bench"'):].splitlines()[0])
        assert all(len(r) == 1 and r[0] > 0 for r in record["round_ratios"].values()), record  # one per round
        for phase in ("plain", "profiled"):  # both sides took their turns, unprofiled and profiled
            assert all(ms > 0 for ms in record["interleaved_ms_per_step"][phase].values()), record
        assert "operators whose self CPU time differs most" in out and "aten::" in out, out
    if "--seeds" in argv:
        assert "standard error" in out and "seed-to-seed" in out, out


@pytest.mark.dist
def test_bench_serve_runs_end_to_end(tmp_path, capsys):
    """`hyrank bench serve` on a tiny artifact (copied: the reloads publish into the copy), both bodies, two client
    counts, tiny sizes: every cell has its in-process and served rates, a reload that swapped, and no error."""
    import json

    from hyrank.bench.serve_load import make_artifact

    made = make_artifact(tmp_path / "made")
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--artifact", str(made.root), "--data", str(made.data), "--seconds", "0.5",
                 "--rounds", "2", "--clients", "1,2", "--rows", "4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ratio = served / in-process" in text and "CPU seconds per 1000 rows served" in text, text
    assert "server exit code after SIGTERM: 0" in text, text
    cells = json.loads(out.read_text())["cells"]
    assert [(c["format"], c["clients"]) for c in cells] == [("json", 1), ("json", 2), ("arrow", 1), ("arrow", 2)]
    for c in cells:
        assert c["swapped"] and c["steady"]["errors"] == 0 and c["reload"]["errors"] == 0, c
        assert c["in_process_rows_per_s"] > 0 and c["steady"]["rows_per_s"] > 0 and len(c["rounds"]) == 2, c
        assert set(c["steady"]["cpu_s_per_1000_rows"]) == {"http", "model", "clients", "in-process"}, c
    assert sorted(p.name for p in (made.root / "versions").iterdir()) == [(made.root / "latest").read_text().strip()]
