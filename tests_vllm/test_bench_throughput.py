"""The pure parts of `kvlab bench vllm --throughput` (no server: the eviction load test covers that):
Prometheus parsing, the default pool, option validation, the argv, the ratios and the table rows."""

from __future__ import annotations

import pytest

from kvlab.errors import KVLabError
from kvlab.experiments import bench_vllm_throughput as tp

METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen2.5-coder-0.5b"} 3.0
vllm:num_requests_waiting{engine="0",model_name="qwen2.5-coder-0.5b"} 9.0
vllm:kv_cache_usage_perc{engine="0",model_name="qwen2.5-coder-0.5b"} 0.8712
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="0",model_name="qwen2.5-coder-0.5b"} 2.0
vllm:num_preemptions_created{engine="0",model_name="qwen2.5-coder-0.5b"} 1.7e+09
vllm:cache_config_info{block_size="128",cache_dtype="auto",engine="0",num_gpu_blocks="133",note="a,b"} 1.0
vllm:request_prefill_time_seconds_sum{engine="0",model_name="m"} 12.0
vllm:request_prefill_time_seconds_count{engine="0",model_name="m"} 4.0
vllm:request_prefill_time_seconds_bucket{engine="0",le="+Inf",model_name="m"} 4.0
process_cpu_seconds_total 51.2
garbage line without a number x
"""


def test_prometheus_text_is_parsed_with_labels():
    samples = tp.parse_prometheus(METRICS)
    assert tp.metric(samples, "vllm:num_requests_running") == 3.0
    assert tp.metric(samples, "vllm:kv_cache_usage_perc") == pytest.approx(0.8712)
    assert tp.metric(samples, "vllm:num_preemptions_total") == 2.0
    assert tp.metric(samples, "process_cpu_seconds_total") == 51.2
    assert tp.metric(samples, "vllm:not_there") is None
    labels = tp.metric_labels(samples, "vllm:cache_config_info")
    assert labels["num_gpu_blocks"] == "133" and labels["note"] == "a,b"
    assert tp.histogram_mean(samples, "vllm:request_prefill_time_seconds") == 3.0
    assert tp.histogram_mean(samples, "vllm:request_decode_time_seconds") is None
    assert not any(name == "garbage" for name, _, _ in samples)


def test_label_sets_of_two_engines_are_summed():
    text = 'vllm:num_requests_running{engine="0"} 2\nvllm:num_requests_running{engine="1"} 5\n'
    assert tp.metric(tp.parse_prometheus(text), "vllm:num_requests_running") == 7.0


def test_default_pool_holds_two_vanilla_requests():
    # 8192 + 128 tokens = 65 pages of 128; two requests, a spare page each, and vLLM's null block
    assert tp.default_kv_blocks(8192, 128) == 2 * (65 + 1) + 1 == 133
    assert tp.default_kv_blocks(4096, 128) == 2 * (33 + 1) + 1
    assert tp.default_kv_blocks(8192, 128, hold=1) == 67
    blocks = tp.default_kv_blocks(8192, 128)
    assert (blocks - 1) // tp.pages(8192 + 128) == 2  # vanilla holds 2, not 3
    # at 1/8, a request keeps about 8 of its 64 prompt pages: the pool holds several times as many decodes
    assert (blocks - 1 - 65) // (8 + 2) + 1 >= 4 * 2 - 1


def test_block_bytes_of_qwen_half_b():
    config = {"num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "hidden_size": 896}
    assert tp.block_bytes(config, "bfloat16") == 12 * 1024 * 128  # 12 KiB per token
    assert tp.block_bytes(config, "float32") == 24 * 1024 * 128


def test_options_are_validated_in_one_line():
    assert tp.check_options(8192, 12, 128, 0.125, None, None, 32768) == (8320, 133)
    assert tp.check_options(8192, 1, 128, 1.0, 200, 9000, 32768) == (9000, 200)
    bad = [((8192, 12, 128, 0.0, None, None, None), "--budget must be in (0, 1]"),
           ((8192, 12, 128, 1.5, None, None, None), "--budget must be in (0, 1]"),
           ((8192, 0, 128, 0.125, None, None, None), "--requests must be >= 1"),
           ((8192, 4, 0, 0.125, None, None, None), "--new-tokens must be >= 1"),
           ((512, 4, 128, 0.125, None, None, None), "at least 1k"),
           ((8192, 4, 128, 0.125, None, 8192, None), "do not fit --max-model-len 8192"),
           ((32768, 4, 128, 0.125, None, None, 32768), "beyond the model's 32768"),
           ((8192, 4, 128, 0.125, 65, None, None), "cannot hold one request")]
    for args, message in bad:
        with pytest.raises(KVLabError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
            tp.check_options(*args)


def test_context_parsing():
    assert tp.parse_tokens("8k") == 8192 and tp.parse_tokens("4K") == 4096 and tp.parse_tokens("6000") == 6000
    with pytest.raises(KVLabError, match="--context takes"):
        tp.parse_tokens("lots")


def test_serve_argv_fixes_the_pool():
    argv = tp.serve_argv("qwen2.5-coder-0.5b", "kv-compress", 0.125, 8123, 8320, 133, 1, "bfloat16", 12)
    assert argv[1:4] == ["-m", "kvlab", "serve"]
    assert argv[argv.index("--budget") + 1] == "0.125"
    extra = argv[argv.index("--") + 1:]
    assert extra[extra.index("--num-gpu-blocks-override") + 1] == "133"
    assert int(extra[extra.index("--max-num-seqs") + 1]) >= 12
    assert "--budget" not in tp.serve_argv("m", "full", 0.125, 8123, 8320, 133, 1, "bfloat16", 12)
    held = tp.serve_argv("m", "h2o", 0.125, 8123, 8320, 133, 1, "bfloat16", 12, budget_tokens=512)
    assert held[held.index("--budget-tokens") + 1] == "512" and "--budget" not in held


def test_the_budget_one_way():
    from kvlab.commands.serve import one_budget

    assert one_budget(None, None, None) == 0.125 and one_budget(0.25, None, None) == 0.25
    assert one_budget(None, 0.75, None) == 0.25 and one_budget(None, None, 512) == 0.125
    for args, message in [((0.25, 0.5, None), "give the budget one way"), ((None, 1.0, None), r"\[0, 1\)"),
                          ((None, None, 0), "--budget-tokens must be >= 1")]:
        with pytest.raises(KVLabError, match=message):
            one_budget(*args)


def fake_result():
    def row(method, running, tok_s, hits, preempt=0, first=((1, 2), (3, 4), (5, 6))):
        timeline = [[0.0, 0, 0, 0.0], [1.0, running, 1, 0.5], [2.0, running // 2, 0, 0.5], [3.0, 0, 0, 0.0]]
        return {"method": method, "budget": None if method == "full" else 0.125, "max_running": running,
                "peak_kv_usage": 0.97, "preemptions": preempt, "output_tok_s": tok_s, "needle": f"{hits}/12",
                "wall_s": 1536 / tok_s, "requests": 3, "first_tokens": [list(f) for f in first],
                "timeline": timeline}

    rows = tp.add_ratios([row("full", 2, 2.0, 12, 3), row("streaming", 8, 4.5, 1, first=((1, 2), (3, 5), ())),
                          row("kv-compress", 9, 5.0, 10)])
    return {"model": "qwen2.5-coder-0.5b", "dtype": "bfloat16", "vllm": "0.32.0", "machine": "cpu, 2 cores",
            "prompt_tokens": 8192, "options": {"requests": 12, "new_tokens": 128},
            "pool": {"pages": 133, "page_tokens": 128, "mib": 199.5, "vanilla_requests_it_holds": 2}, "rows": rows}


def test_ratios_and_table_rows():
    result = fake_result()
    kv = result["rows"][2]
    assert kv["concurrency_vs_vanilla"] == 4.5 and kv["throughput_vs_vanilla"] == 2.5
    rows = tp.table_rows(result)
    assert [r["method"] for r in rows] == ["full", "streaming", "kv-compress"]
    assert list(rows[0]) == ["method", "budget", "max running", "mean running", "peak KV usage %", "preemptions",
                             "output tok/s", "concurrency vs vanilla", "mean running vs vanilla",
                             "throughput vs vanilla", "needle", "first 64 = vanilla", "wall s"]
    assert [r["mean running"] for r in rows] == [1.5, 6.0, 6.5]  # samples with requests out: (2 + 1) / 2 ...
    assert rows[2]["mean running vs vanilla"] == "4.33x"
    assert [r["first 64 = vanilla"] for r in rows] == ["3/3", "1/3", "3/3"]
    assert rows[0]["budget"] == "-" and rows[0]["concurrency vs vanilla"] == "1.00x"
    assert rows[2]["concurrency vs vanilla"] == "4.50x" and rows[2]["throughput vs vanilla"] == "2.50x"
    assert rows[1]["peak KV usage %"] == 97.0 and rows[0]["preemptions"] == 3
    title = tp.title(result)
    assert "12 requests of 8192 prompt + 128 new tokens" in title and "pool 133 pages" in title


def test_ratios_without_vanilla_are_left_out():
    rows = tp.add_ratios([{"method": "kv-compress", "max_running": 5, "output_tok_s": 3.0}])
    assert rows[0]["concurrency_vs_vanilla"] is None and rows[0]["throughput_vs_vanilla"] is None
    assert rows[0]["mean_running"] is None and rows[0]["mean_running_vs_vanilla"] is None


def test_mean_running_counts_only_while_requests_are_out():
    timeline = [[0.0, 0, 0, 0.0], [1.0, 0, 4, 0.1], [2.0, 4, 0, 0.9], [3.0, 2, 0, 0.5], [4.0, 0, 0, 0.0]]
    assert tp.mean_running(timeline) == 2.0 and tp.mean_running([]) is None


def test_the_table_prints(capsys):
    from kvlab.commands.output import print_table

    result = fake_result()
    print_table(tp.table_rows(result), title=tp.title(result))
    text = capsys.readouterr().out
    assert "kv-compress" in text and "4.50x" in text


def test_methods_are_chosen_from_what_vllm_evicts_with():
    from kvlab.commands.serve import throughput_methods
    from kvlab.vllm.methods import EVICTS, runnable

    assert throughput_methods("full,streaming,kv-compress") == ("full", "streaming", "kv-compress")
    assert throughput_methods("all") == ("full", *runnable(EVICTS)) and "snapkv" in throughput_methods("all")
    for bad, words in [("block-route", "not a method vLLM evicts with"), ("ada-snapkv", "allowed: full, "),
                       ("snapkv,snapkv", "twice"), (" , ", "at least one")]:
        with pytest.raises(KVLabError, match=words):
            throughput_methods(bad)


def test_a_method_with_a_block_table_per_layer_gets_the_same_memory_in_layer_pages():
    from kvlab.commands.serve import pool_groups

    assert pool_groups(("full", "snapkv", "kv-compress", "pyramidkv"), 0.125, 24) == {
        "full": 1, "snapkv": 1, "kv-compress": 1, "pyramidkv": 24}



def test_a_measured_row_is_saved_and_reused_only_for_the_same_options(tmp_path):
    """A long run resumes: a method's row measured with the same options is read back, not measured again."""
    calls = []

    def measure(value):
        def go():
            calls.append(value)
            return {"method": "snapkv", "output_tok_s": value}
        return go

    path = tmp_path / "row-snapkv.json"
    key = {"context": 4096, "budget": 0.125}
    assert tp.saved_row(path, key, measure(1.0)) == {"method": "snapkv", "output_tok_s": 1.0}
    assert tp.saved_row(path, key, measure(2.0))["output_tok_s"] == 1.0 and calls == [1.0]
    assert tp.saved_row(path, {**key, "budget": 0.25}, measure(3.0))["output_tok_s"] == 3.0
    assert calls == [1.0, 3.0] and not path.with_suffix(".part").exists()


def test_a_failed_measurement_saves_nothing(tmp_path):
    def fail():
        raise KVLabError("the server died")

    with pytest.raises(KVLabError):
        tp.saved_row(tmp_path / "row-h2o.json", {}, fail)
    assert list(tmp_path.iterdir()) == []
