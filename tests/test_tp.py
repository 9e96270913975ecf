"""Tensor parallelism (fp_compile.demo.tp): the built-in model sharded by heads over two CPU
processes (gloo), compiled with the flashprefill backend on each rank.

One ``torch.multiprocessing.spawn`` of two ranks does every distributed check (each rank saves
what it saw; the assertions run here): at alpha 0 the rewritten TP model equals the unsharded
eager model; each rank's op got its own heads and the compiled code has the two all-reduces per
layer and no all-gather; at a nonzero alpha each rank's op ran sparse and equals the unsharded
model run with the same op eagerly; prefill + decode of the sharded model (eager) equal the
unsharded model's.
"""

import copy
import re

import pytest
import torch
import torch.multiprocessing as mp

from fp_compile.demo.models import ModelArgs, Transformer, build_hf_llama
from fp_compile.demo.tp import check_shardable, decoder_layers, tp_plan_for
from tests.helpers import assert_close

WORLD = 2
TINY = ModelArgs(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                 intermediate_size=128, max_seq_len=320)
SEQ = 256
# block 16: 16 query blocks; min_seq_len below SEQ so that the op takes the sparse path
EXACT = dict(alpha=0.0, block_size=16, min_seq_len=64)
# dense_above=1: no kv group runs dense, so that a rank's result cannot depend on which
# groups the other rank holds (the whole-call fallback counts the groups of one call)
SPARSE = dict(alpha=0.3, block_size=16, min_seq_len=64, dense_above=1.0)


def _tiny_planted():
    from fp_compile.demo.models import plant_attention_structure

    torch.manual_seed(0)
    return plant_attention_structure(Transformer(TINY).eval())


def _ids():
    ids = torch.randint(1, TINY.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 0
    return ids


def _with_op(model, ids, config):
    """``model.hidden(ids)`` eagerly with every SDPA call replaced by fp_compile's op."""
    import fp_compile

    class Swap(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.nn.functional.scaled_dot_product_attention:
                assert kwargs.get("is_causal")
                return fp_compile.flash_prefill(*args, enable_gqa=True, config=config)
            return func(*args, **kwargs)

    with Swap():
        return model.hidden(ids)


def _worker(rank: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch._inductor.utils import run_and_get_code
    from torch.distributed.device_mesh import init_device_mesh

    import fp_compile
    from fp_compile.demo.tp import shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        model = _tiny_planted()
        single = copy.deepcopy(model)
        shard_model(model, mesh)
        ids = _ids()
        res = {}
        with torch.no_grad():
            exact = fp_compile.make_backend(fp_compile.FlashPrefillConfig(**EXACT))
            res["exact"], code = run_and_get_code(torch.compile(model.hidden, backend=exact), ids)
            report = exact.last_report()
            res["rewritten"] = sorted((r.layer, r.q_shape, r.kv_shape) for r in report.rewritten)
            res["skipped"] = list(report.skipped)
            code = "\n".join(code)
            res["all_reduce"] = len(re.findall(r"_c10d_functional\.all_reduce_?\.default\(", code))
            res["all_gather"] = code.count("all_gather")
            res["single_dense"] = single.hidden(ids)

            torch._dynamo.reset()
            fp_compile.reset_stats()
            cfg = fp_compile.FlashPrefillConfig(**SPARSE, collect_stats=True)
            res["sparse"] = torch.compile(model.hidden, backend=fp_compile.make_backend(cfg))(ids)
            res["stats"] = [(r.layer, r.sparse, r.head_density) for r in fp_compile.stats()]
            res["single_sparse"] = _with_op(single, ids, fp_compile.FlashPrefillConfig(**SPARSE))

            # decode from the static KV cache (its kv heads are this rank's), eagerly
            model.setup_caches(1, SEQ + 4)
            single.setup_caches(1, SEQ + 4)
            pos = torch.arange(SEQ)
            steps = [(model(ids, pos), single(ids, pos))]
            for t in range(3):
                token = steps[-1][1][:, -1:].argmax(-1)
                steps.append((model(token, torch.tensor([SEQ + t])),
                              single(token, torch.tensor([SEQ + t]))))
            res["decode"] = steps
            res["cache_heads"] = model.layers[0].attention.kv_cache.k.shape[1]
        torch.save(res, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two ranks saw (a list of dicts, rank order)."""
    tmp = tmp_path_factory.mktemp("tp")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_every_layer_rewritten_on_each_rank_with_its_own_heads(ranks):
    local_q = (1, TINY.n_heads // WORLD, SEQ, TINY.head_dim)
    local_kv = (1, TINY.n_kv_heads // WORLD, SEQ, TINY.head_dim)
    for res in ranks:
        assert res["skipped"] == []
        assert res["rewritten"] == [(layer, local_q, local_kv) for layer in range(TINY.n_layers)]


def test_no_gather_of_qkv_only_the_two_all_reduces_per_layer(ranks):
    for res in ranks:
        assert res["all_gather"] == 0
        assert res["all_reduce"] == 2 * TINY.n_layers, res["all_reduce"]


def test_tp_at_alpha_0_equals_the_single_process_model(ranks):
    for res in ranks:
        assert_close(res["exact"], res["single_dense"], 1e-5, 1e-4, "TP hidden states, alpha 0")


def test_tp_sparse_runs_sparse_and_equals_the_single_process_op(ranks):
    for res in ranks:
        assert [(layer, sparse) for layer, sparse, _ in res["stats"]] == [(0, True), (1, True)]
        densities = [d for _, _, heads in res["stats"] for d in heads]
        assert len(densities) == TINY.n_layers * TINY.n_heads // WORLD
        print("rank densities", densities)
        assert max(densities) < 1.0, densities
        assert_close(res["sparse"], res["single_sparse"], 1e-5, 1e-4, "TP hidden states, sparse")
    # the sparse result differs from dense: the op really skipped blocks
    diff = (ranks[0]["sparse"] - ranks[0]["single_dense"]).abs().max().item()
    print("sparse vs dense max abs diff", diff)
    assert diff > 1e-3


def test_tp_prefill_then_decode_equals_the_single_process_model(ranks):
    for res in ranks:
        assert res["cache_heads"] == TINY.n_kv_heads // WORLD
        for i, (tp, one) in enumerate(res["decode"]):
            assert_close(tp, one, 1e-5, 1e-4, f"logits of step {i}")


def test_plans_and_divisibility():
    plan = tp_plan_for(Transformer(TINY))
    assert {k: type(v).__name__ for k, v in plan.items()} == {
        "attention.q_proj": "ColwiseParallel", "attention.k_proj": "ColwiseParallel",
        "attention.v_proj": "ColwiseParallel", "attention.o_proj": "RowwiseParallel",
        "gate_proj": "ColwiseParallel", "up_proj": "ColwiseParallel",
        "down_proj": "RowwiseParallel"}
    pytest.importorskip("transformers")
    hf = build_hf_llama(TINY)
    hf_plan = tp_plan_for(hf)
    assert {k: type(v).__name__ for k, v in hf_plan.items()} == {
        "self_attn.q_proj": "ColwiseParallel", "self_attn.k_proj": "ColwiseParallel",
        "self_attn.v_proj": "ColwiseParallel", "self_attn.o_proj": "RowwiseParallel",
        "mlp.gate_proj": "ColwiseParallel", "mlp.up_proj": "ColwiseParallel",
        "mlp.down_proj": "RowwiseParallel"}
    layer = decoder_layers(hf)[0]
    assert all(layer.get_submodule(path) is not None for path in hf_plan)
    check_shardable(hf, 2)
    with pytest.raises(ValueError, match="kv heads"):
        check_shardable(Transformer(TINY), 4)
