"""Multi-token-prediction (MTP) layers: their PR2 routers, layer numbers, and the route table.

Megatron builds the MTP layer from the decoder block's last layer spec
(``get_gpt_mtp_block_spec``), so a PR2 block spec gives the MTP layer a PR2 router. Core 0.16.1
numbers it past the decoder (``num_layers + 1``); 0.19.2 numbers it 1 within the MTP block and
passes ``is_mtp_layer=True``: ``route_layer_number`` is ``num_layers + 1`` on both.
"""

import pytest
import torch

from pr2_megatron.routes import MicroBatch, RoutePath, from_engine_routed_experts
from pr2_megatron.routing import PR2Router, RoutingController

pytestmark = pytest.mark.usefixtures("megatron_single")

NUM_LAYERS, E, K, SEQ, BATCH = 2, 4, 2, 8, 2


def _mtp_model():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    from pr2_megatron.models import MoEModelConfig
    from pr2_megatron.models.builder import transformer_config
    from pr2_megatron.routing import pr2_decoder_block_spec
    from pr2_megatron.runtime.parallel import ParallelConfig, initialize_parallel

    parallel = ParallelConfig()
    initialize_parallel(parallel)
    config = transformer_config(MoEModelConfig(num_layers=NUM_LAYERS, num_experts=E), parallel)
    config.mtp_num_layers = 1
    spec = pr2_decoder_block_spec(config)
    mtp_spec = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=64,
        max_sequence_length=64,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
        mtp_block_spec=mtp_spec,
    )


def _data():
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (BATCH, SEQ), generator=generator)
    return ids, torch.randint(0, 64, (BATCH, SEQ), generator=generator)


def _forward(model, ids, labels):
    return model(ids, torch.arange(SEQ).expand_as(ids), None, labels=labels)


def _dispatched(model):
    maps = {}

    def hook(router, inputs, output):
        maps.setdefault(router.route_layer_number, []).append(output[1].clone())

    for router in model.modules():
        if isinstance(router, PR2Router):
            router.register_forward_hook(hook)
    return maps


def _move_routers(model):
    with torch.no_grad():
        for router in model.modules():
            if isinstance(router, PR2Router):
                router.weight.add_(torch.randn_like(router.weight))


def test_mtp_routers_have_their_own_layer_numbers_and_need_a_choice():
    model = _mtp_model()
    routers = sorted(
        (m for m in model.modules() if isinstance(m, PR2Router)),
        key=lambda r: r.route_layer_number,
    )
    assert [r.route_layer_number for r in routers] == [1, 2, 3]
    assert [r.is_mtp for r in routers] == [False, False, True]
    with pytest.raises(ValueError, match=r"multi-token-prediction routers \(MoE layers \[3\]"):
        RoutingController(model)
    assert RoutingController(model, mtp="exclude").layer_numbers == [1, 2]
    assert RoutingController(model, mtp="include").layer_numbers == [1, 2, 3]


def test_engine_format_routes_feed_a_model_with_excluded_mtp_routers():
    model = _mtp_model()
    ctl = RoutingController(model, mtp="exclude")
    path = RoutePath(ctl)
    ids, labels = _data()
    ctl.record()
    with torch.no_grad():
        _forward(model, ids, labels)
    recorded_TLK = ctl.collect_routes()[0]  # [S*B, 2 decoder layers, K]
    # The engine returns [T_i, num_hidden_layers, K] per request (decoder layers only).
    per_request = [recorded_TLK.view(SEQ, BATCH, NUM_LAYERS, K)[:, b] for b in range(BATCH)]
    table = from_engine_routed_experts(
        per_request,
        moe_layer_numbers=ctl.layer_numbers,
        num_experts=E,
        topk=K,
        num_hidden_layers=NUM_LAYERS,
    )
    _move_routers(model)
    maps = _dispatched(model)
    ctl.replay(collect_metrics=True)
    batch = MicroBatch([1, 0], SEQ)  # another order
    targets = path.targets(table, batch)
    path.set_targets(table, batch)
    _forward(model, ids[[1, 0]], labels[[1, 0]]).sum().backward()
    ctl.finish()  # the MTP router consumed no target and expected none
    for column, layer in enumerate((1, 2)):
        expected = torch.zeros_like(maps[layer][0]).scatter_(1, targets[:, column], True)
        assert torch.equal(maps[layer][0], expected)
    # The MTP router routed live: its map is its own top-k of the moved weights.
    mtp = next(r for r in ctl.excluded_routers)
    assert mtp.phase.value == "off" and len(maps[3]) == 1
    assert maps[3][0].sum(1).eq(K).all()


def test_included_mtp_router_records_and_replays():
    model = _mtp_model()
    ctl = RoutingController(model, mtp="include")
    ids, labels = _data()
    ctl.record()
    with torch.no_grad():
        _forward(model, ids, labels)
    routes = ctl.collect_routes()[0]
    assert routes.shape == (SEQ * BATCH, 3, K)
    _move_routers(model)
    maps = _dispatched(model)
    ctl.replay(collect_metrics=True)
    ctl.set_targets(routes)
    _forward(model, ids, labels).sum().backward()
    ctl.finish()
    for column, layer in enumerate((1, 2, 3)):
        expected = torch.zeros_like(maps[layer][0]).scatter_(1, routes[:, column].long(), True)
        assert torch.equal(maps[layer][0], expected)
    assert ctl.metrics()["zero_deviation_ratio"] < 1.0  # the routers did move
