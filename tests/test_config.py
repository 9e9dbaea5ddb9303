"""SparseConfig: both JSON schemas round-trip, MInference files map to the right patterns, budgets scale with the
input length, and every kind of bad file gets an error naming where it is wrong."""
import json
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparse_attn import AShape, BlockSparse, Dense, Grid, ModalitySpans, QBoundary, TwoDBoundary, VerticalSlash
from sparse_attn.config import SparseConfig, resolve_config, scale_pattern

# ---------------------------------------------------------------------------------------------------- strategies
budget = st.integers(64, 20000)
vertical_slash = st.builds(VerticalSlash, vertical=budget, slash=budget)
a_shape = st.builds(AShape, sink=st.integers(0, 512), local=st.integers(0, 8192))
block_sparse = st.builds(BlockSparse, top_k=st.integers(1, 500))
minference_pattern = st.one_of(vertical_slash, a_shape, block_sparse, st.just(Dense()))
# our schema also carries the settings MInference cannot express
rich_vs = st.builds(VerticalSlash, vertical=budget, slash=budget, last_q=st.integers(1, 128),
                    gamma=st.one_of(st.none(), st.floats(0.05, 1.0)), sink=st.integers(0, 64),
                    local=st.integers(0, 64))
rich_bs = st.builds(BlockSparse, top_k=st.one_of(st.none(), st.integers(1, 500)),
                    gamma=st.one_of(st.none(), st.floats(0.05, 1.0)))
any_pattern = st.one_of(rich_vs, a_shape, rich_bs, st.just(Dense()))


@st.composite
def configs(draw, pattern=any_pattern, with_reference=True):
    n_layers, n_heads = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    layers = [None if draw(st.booleans()) and draw(st.booleans())
              else [draw(pattern) for _ in range(n_heads)] for _ in range(n_layers)]
    with_scores = draw(st.booleans())
    scores = [[draw(st.floats(0, 1)) for _ in range(n_heads)] for _ in range(n_layers)] if with_scores else None
    ref = draw(st.one_of(st.none(), st.integers(1, 1 << 20))) if with_reference else None
    return SparseConfig(n_layers, n_heads, layers, reference_length=ref, scores=scores)


def _dense_scores_cleared(cfg):
    """Scores of dense layers do not survive our schema (a dense layer has no heads); compare without them."""
    if cfg.scores is None:
        return None
    return [None if heads is None else row for heads, row in zip(cfg.layers, cfg.scores)]


# ---------------------------------------------------------------------------------------------------- round trips
@given(configs())
def test_round_trip_our_schema(cfg):
    obj = json.loads(json.dumps(cfg.to_json()))
    back = SparseConfig.load(obj)
    assert back.layers == cfg.layers
    assert back.reference_length == cfg.reference_length
    expected = _dense_scores_cleared(cfg)
    if expected is not None and all(row is None for row in expected):
        expected = None
    assert back.scores == expected
    assert (back.num_layers, back.num_heads) == (cfg.num_layers, cfg.num_heads)


@given(configs(pattern=minference_pattern, with_reference=False))
def test_round_trip_minference_schema(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # representable configs lose nothing, so no warning
        obj = json.loads(json.dumps(cfg.to_json("minference")))
    assert isinstance(obj, list) and len(obj) == cfg.num_layers
    assert all(sorted(layer) == sorted(str(h) for h in range(cfg.num_heads)) for layer in obj)
    back = SparseConfig.load(obj)
    assert back.layers == cfg.layers
    for i in range(cfg.num_layers):
        if cfg.scores is not None and cfg.layers[i] is not None:
            assert back.scores[i] == pytest.approx(cfg.scores[i])


def test_save_load_files_both_formats(tmp_path):
    cfg = SparseConfig(2, 3, [[VerticalSlash(vertical=500, slash=700), AShape(sink=64, local=1024),
                               BlockSparse(top_k=30)], None], reference_length=8192, metadata={"model": "tiny"})
    cfg.save(tmp_path / "ours.json")
    assert SparseConfig.load(tmp_path / "ours.json") == cfg
    assert SparseConfig.load(str(tmp_path / "ours.json")) == cfg
    with pytest.warns(UserWarning, match="reference_length"):
        cfg.save(tmp_path / "minf.json", format="minference")
    back = SparseConfig.load(tmp_path / "minf.json")
    assert back.layers == cfg.layers and back.reference_length is None
    with pytest.raises(ValueError, match="format"):
        cfg.save(tmp_path / "x.json", format="vllm")


def test_minference_export_warns_on_lost_settings():
    cfg = SparseConfig.uniform(VerticalSlash(gamma=0.9), 1, 2)
    with pytest.warns(UserWarning, match="gamma"):
        obj = cfg.to_json("minference")
    assert obj == [{"0": ["vertical_and_slash", 1000, 6096, 0.0], "1": ["vertical_and_slash", 1000, 6096, 0.0]}]


# ---------------------------------------------------------------------------------------------------- MInference files
PUBLISHED_STYLE = """[
 {"0": ["vertical_and_slash", 1000, 6096, 0.9], "1": ["vertical_and_slash", 30, 800, 0.95],
  "2": ["stream_llm", 100, 800, 0.8], "3": ["block_sparse", 8, 1, 0.7]},
 {"0": ["vertical_and_slash", 3500, 100, 0.99], "1": ["vertical_and_slash", 100, 750, 0.98],
  "2": ["vertical_and_slash", 500, 700, 0.97], "3": ["vertical_and_slash", 1000, 6096, 0.96]}
]"""


def test_minference_file_maps_to_patterns(tmp_path):
    path = tmp_path / "best_pattern.json"
    path.write_text(PUBLISHED_STYLE)
    cfg = SparseConfig.load(path)
    assert (cfg.num_layers, cfg.num_heads, cfg.reference_length) == (2, 4, None)
    layer0 = cfg.patterns_for_layer(0, 100_000)
    assert layer0[0] == VerticalSlash(vertical=1000, slash=6096)
    assert layer0[1] == VerticalSlash(vertical=30, slash=800, sink=30, local=64)     # sink cannot exceed 30 columns
    assert layer0[2] == AShape(sink=100, local=800)
    assert layer0[3] == BlockSparse(top_k=8)
    assert cfg.patterns_for_layer(1, 5)[0] == VerticalSlash(vertical=3500, slash=100)
    assert cfg.scores[0] == [0.9, 0.95, 0.8, 0.7]
    cfg.check_model(2, 4)


def test_minference_integer_keys_and_three_entries():
    cfg = SparseConfig.load([{0: ["vertical_and_slash", 100, 200], 1: ["dense", 0, 0, 1]}])
    assert cfg.layers[0] == [VerticalSlash(vertical=100, slash=200), Dense()]
    assert SparseConfig.load([{"0": ["dense", 0, 0, 1]}]).patterns_for_layer(0, 10) is None
    assert SparseConfig.load([{"0": ["block_sparse", 0, 0, 1]}]).layers[0] == [BlockSparse(top_k=100)]


# ---------------------------------------------------------------------------------------------------- length scaling
def test_length_scaling_rule():
    vs = VerticalSlash(vertical=256, slash=512, min_vertical=128, min_slash=256)
    cfg = SparseConfig(1, 3, [[vs, AShape(sink=16, local=1000), BlockSparse(top_k=10)]], reference_length=4096)
    double = cfg.patterns_for_layer(0, 8192)
    assert double[0] == VerticalSlash(vertical=512, slash=1024, min_vertical=256, min_slash=512)
    assert double[1] == AShape(sink=16, local=2000)                        # sink is a fixed size
    assert double[2] == BlockSparse(top_k=20)
    assert cfg.patterns_for_layer(0, 4096) == cfg.layers[0]
    third = cfg.patterns_for_layer(0, 4096 // 3)                          # rounded up: ceil(b * L / ref)
    assert third[0].vertical == -(-256 * (4096 // 3) // 4096) and third[2].top_k == 4
    tiny = cfg.patterns_for_layer(0, 10)                                   # clamped at min(budget, 64) / 1 block
    assert (tiny[0].vertical, tiny[0].slash, tiny[1].local, tiny[2].top_k) == (64, 64, 64, 1)
    assert tiny[0].sink <= tiny[0].vertical and tiny[0].local <= tiny[0].slash


def test_length_scaling_keeps_small_budgets_and_gamma():
    vs = VerticalSlash(vertical=32, slash=48, sink=8, local=16, gamma=0.9)
    scaled = scale_pattern(vs, 1e-3)
    assert (scaled.vertical, scaled.slash, scaled.gamma, scaled.sink, scaled.local) == (32, 48, 0.9, 8, 16)
    assert scale_pattern(Dense(), 10.0) == Dense()
    assert scale_pattern(BlockSparse(gamma=0.9), 3.0) == BlockSparse(gamma=0.9)   # top_k None stays None


def test_without_reference_budgets_are_fixed():
    cfg = SparseConfig.uniform(VerticalSlash(vertical=300, slash=600), 2, 2)
    assert cfg.patterns_for_layer(1, 1_000_000) == [VerticalSlash(vertical=300, slash=600)] * 2


# ---------------------------------------------------------------------------------------------------- API
def test_resolve_config_forms(tmp_path):
    vs = VerticalSlash(vertical=300, slash=600)
    assert resolve_config(None, 2, 3) is None
    assert resolve_config(vs, 2, 3) == SparseConfig.uniform(vs, 2, 3)
    heads = [vs, AShape(), Dense()]
    assert resolve_config(heads, 2, 3).patterns_for_layer(1, 100) == heads
    cfg = SparseConfig.uniform(vs, 2, 3)
    assert resolve_config(cfg, 2, 3) is cfg
    cfg.save(tmp_path / "c.json")
    assert resolve_config(tmp_path / "c.json", 2, 3) == cfg
    assert resolve_config(str(tmp_path / "c.json"), 2, 3) == cfg
    assert resolve_config(cfg.to_json(), 2, 3) == cfg
    assert resolve_config(cfg.to_json("minference"), 2, 3).layers == cfg.layers
    with pytest.raises(TypeError, match="config must be"):
        resolve_config(3.5, 2, 3)
    with pytest.raises(ValueError, match="one pattern per query head"):
        resolve_config([vs, vs], 2, 3)


def test_check_model_names_expected_and_found():
    cfg = SparseConfig.uniform(Dense(), 4, 8)
    with pytest.raises(ValueError, match=r"model has 2 layers, the config has 4"):
        cfg.check_model(2, 8)
    with pytest.raises(ValueError, match=r"model has 16 query heads per layer, the config has 8"):
        resolve_config(cfg, 4, 16)
    cfg.check_model(4, 8)


def test_dense_layers_and_patterns_for_layer_errors():
    cfg = SparseConfig(3, 2, [None, [Dense(), Dense()], [AShape(), Dense()]])
    assert cfg.dense_layers == [0, 1]                                    # all-dense heads make a dense layer
    assert cfg.patterns_for_layer(0, 100) is None and cfg.patterns_for_layer(1, 100) is None
    assert cfg.patterns_for_layer(2, 100) == [AShape(), Dense()]
    with pytest.raises(ValueError, match="layer_idx"):
        cfg.patterns_for_layer(3, 100)
    with pytest.raises(ValueError, match="seq_len"):
        cfg.patterns_for_layer(0, 0)


def test_constructor_validation():
    with pytest.raises(ValueError, match="layer 1: has 1 heads, expected num_heads=2"):
        SparseConfig(2, 2, [None, [Dense()]])
    with pytest.raises(ValueError, match="layers has 1 entries, num_layers is 2"):
        SparseConfig(2, 2, [None])
    with pytest.raises(ValueError, match="layer 0, head 1: not a Pattern"):
        SparseConfig(1, 2, [[Dense(), "dense"]])
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        SparseConfig(1, 0, [None])


# ---------------------------------------------------------------------------------------------------- bad files
def ours(layers, **top):
    obj = {"format": "sparse_attn.config", "version": 1, "num_layers": len(layers), "num_heads": 2,
           "layers": layers}
    obj.update(top)
    return obj


VS = {"pattern": "vertical_slash", "vertical": 100, "slash": 200}
BAD_OURS = [
    (ours([[VS, {"pattern": "diagonal"}]]), r"layer 0, head 1: unknown pattern 'diagonal'"),
    (ours([[VS, {"pattern": "a_shape", "local": -5}]]), r"layer 0, head 1: invalid AShape: local must be >= 0"),
    (ours([[VS, {"pattern": "block_sparse", "top_k": "ten"}]]), r"layer 0, head 1: field 'top_k' must be a number"),
    (ours([[VS, {"pattern": "block_sparse", "top_k": 2.5}]]), r"layer 0, head 1: field 'top_k' must be an integer"),
    (ours([[VS, {"pattern": "a_shape", "windw": 5}]]), r"layer 0, head 1: unknown field 'windw'"),
    (ours([[VS, {"pattern": "vertical_slash", "vertical": None}]]), r"layer 0, head 1: field 'vertical' must not"),
    (ours([[VS, {"pattern": "vertical_slash", "vertical": True}]]), r"layer 0, head 1: field 'vertical' must be a n"),
    (ours([[VS, {"pattern": "dense", "score": "high"}]]), r"layer 0, head 1: score must be a finite number"),
    (ours([[VS, VS, VS]]), r"layer 0: has 3 heads, num_heads is 2"),
    (ours(["dense", "sparse"]), r"layer 1: must be \"dense\" or a list"),
    (ours([[VS, VS]], num_layers=3), r"'layers' has 1 entries, num_layers is 3"),
    (ours([[VS, VS]], num_heads=-1), r"num_heads must be a positive int"),
    (ours([[VS, VS]], reference_length=0), r"reference_length must be a positive int"),
    (ours([[VS, VS]], version=2), r"unsupported 'version' 2"),
    (ours([[VS, VS]], format="other"), r"'format' must be 'sparse_attn.config'"),
    (ours([[VS, VS]], extra=1), r"unknown top-level key 'extra'"),
    ({"layers": []}, r"'format' must be"),
    (ours([{"0": ["vertical_and_slash", 1, 2, 0.5], "1": ["dense", 0, 0, 1]}]), r"layer 0: .*mixed schemas"),
    (ours([[VS, ["vertical_and_slash", 1, 2, 0.5]]]), r"layer 0, head 1: .*mixed schemas"),
    (42, r"must be a JSON object"),
]
BAD_MINFERENCE = [
    ([], r"list of layers is empty"),
    ([{"0": ["vertical_and_slash", 1000, 6096, 0.9], "1": ["dialted", 10, 20, 0.9]}], r"layer 0, head 1: unknown type"),
    ([{"0": ["vertical_and_slash", -1, 6096, 0.9]}], r"layer 0, head 0: vertical must be >= 0"),
    ([{"0": ["stream_llm", 100, -8, 0.9]}], r"layer 0, head 0: slash must be >= 0"),
    ([{"0": ["vertical_and_slash", "1000", 6096, 0.9]}], r"layer 0, head 0: vertical must be an integer"),
    ([{"0": ["vertical_and_slash", 10.5, 6096, 0.9]}], r"layer 0, head 0: vertical must be an integer"),
    ([{"0": ["vertical_and_slash", 10, 6096, "x"]}], r"layer 0, head 0: score must be a finite number"),
    ([{"0": ["vertical_and_slash", 10]}], r"layer 0, head 0: must be a list \[type, vertical, slash, score\]"),
    ([{"0": ["dense", 0, 0, 1], "1": ["dense", 0, 0, 1]}, {"0": ["dense", 0, 0, 1]}],
     r"layer 1: has 1 heads, layer 0 has 2"),
    ([{"0": ["dense", 0, 0, 1], "2": ["dense", 0, 0, 1]}], r"layer 0: heads must be numbered 0..1 without gaps"),
    ([{"head0": ["dense", 0, 0, 1]}], r"layer 0: head keys must be head numbers"),
    ([["vertical_and_slash", 1, 2, 3]], r"layer 0: must be an object"),
    ([[{"pattern": "dense"}]], r"layer 0: .*mixed schemas"),
    ([{"0": {"pattern": "dense"}}], r"layer 0, head 0: .*mixed schemas"),
]


@pytest.mark.parametrize("obj, message", BAD_OURS + BAD_MINFERENCE,
                         ids=[f"ours{i}" for i in range(len(BAD_OURS))] + [f"minf{i}" for i in range(len(BAD_MINFERENCE))])
def test_bad_config_errors(obj, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        SparseConfig.load(obj)
    path = tmp_path / "bad.json"                    # the same from a file: the message also names the file
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match=message) as info:
        SparseConfig.load(path)
    assert "bad.json" in str(info.value)


def test_bad_file_contents(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("[{\"0\": [\"vertical_and_slash\", 1000,")
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        SparseConfig.load(path)
    with pytest.raises(FileNotFoundError):
        SparseConfig.load(tmp_path / "missing.json")


def test_all_reasons_in_one_message():
    obj = [{"0": ["nope", 1, 2, 0.5], "1": ["vertical_and_slash", -3, 2, 0.5]}]
    with pytest.raises(ValueError) as info:
        SparseConfig.load(obj)
    assert "head 0: unknown type" in str(info.value) and "head 1: vertical must be >= 0" in str(info.value)


# ---------------------------------------------------------------------------------------------------- modality
modality_pattern = st.one_of(
    st.builds(QBoundary, vertical=budget, slash=budget, gamma=st.one_of(st.none(), st.floats(0.05, 1.0)),
              consistent_columns=st.booleans()),
    st.builds(TwoDBoundary, vertical=budget, slash=budget, last_q=st.integers(1, 128)),
    st.builds(Grid, vertical=budget, slash=budget, stride=st.one_of(st.none(), st.integers(1, 4096)),
              width=st.integers(0, 32), frames=st.one_of(st.none(), st.integers(1, 64)), tail_columns=st.booleans()))


@given(configs(pattern=st.one_of(modality_pattern, rich_vs, st.just(Dense()))))
def test_round_trip_our_schema_with_modality_patterns(cfg):
    obj = json.loads(json.dumps(cfg.to_json()))
    back = SparseConfig.load(obj)
    assert back.layers == cfg.layers
    assert all("modality" not in head for layer in obj["layers"] if layer != "dense" for head in layer)


def test_modality_pattern_names_and_fields_load():
    obj = {"format": "sparse_attn.config", "version": 1, "num_layers": 1, "num_heads": 3, "layers": [[
        {"pattern": "grid", "vertical": 300, "stride": 576, "width": 4, "tail_columns": False},
        {"pattern": "q_boundary", "gamma": 0.9, "consistent_columns": False},
        {"pattern": "two_d_boundary", "slash": 2048}]]}
    cfg = SparseConfig.load(obj)
    assert cfg.layers[0] == [Grid(vertical=300, stride=576, width=4, tail_columns=False),
                             QBoundary(gamma=0.9, consistent_columns=False), TwoDBoundary(slash=2048)]
    bad = json.loads(json.dumps(obj))
    bad["layers"][0][1]["consistent_columns"] = 1
    with pytest.raises(ValueError, match=r"layer 0, head 1: field 'consistent_columns' must be true or false"):
        SparseConfig.load(bad)


def test_modality_field_rejected_in_file_and_in_config():
    obj = {"format": "sparse_attn.config", "version": 1, "num_layers": 1, "num_heads": 1,
           "layers": [[{"pattern": "grid", "modality": [[0, 10, "video"]]}]]}
    with pytest.raises(ValueError, match=r"layer 0, head 0: field 'modality' is not allowed in a config"):
        SparseConfig.load(obj)
    with_spans = QBoundary().with_modality(ModalitySpans.of([(0, 10, "image")]))
    with pytest.raises(ValueError, match=r"layer 0, head 1: QBoundary carries modality spans"):
        SparseConfig(1, 2, [[Dense(), with_spans]])


def test_modality_patterns_scale_like_vertical_slash():
    for cls in (Grid, QBoundary, TwoDBoundary):
        p = cls(vertical=1000, slash=4000, min_vertical=128, min_slash=512, sink=64, local=64)
        vs = VerticalSlash(vertical=1000, slash=4000, min_vertical=128, min_slash=512, sink=64, local=64)
        for factor in (0.01, 0.5, 2.0):
            got, want = scale_pattern(p, factor), scale_pattern(vs, factor)
            assert type(got) is cls
            assert {n: getattr(got, n) for n in ("vertical", "slash", "min_vertical", "min_slash", "sink", "local")} \
                == {n: getattr(want, n) for n in ("vertical", "slash", "min_vertical", "min_slash", "sink", "local")}
    g = scale_pattern(Grid(stride=576, width=8, frames=4), 0.25)
    assert (g.stride, g.width, g.frames) == (576, 8, 4)                 # frame geometry does not scale
    cfg = SparseConfig.uniform(QBoundary(vertical=1000, slash=4000), 1, 2, reference_length=8000)
    assert cfg.patterns_for_layer(0, 16000)[0] == QBoundary(vertical=2000, slash=8000, min_vertical=256, min_slash=1024)


def test_minference_export_of_modality_pattern_raises():
    cfg = SparseConfig(2, 2, [None, [VerticalSlash(), Grid()]])
    with pytest.raises(ValueError, match=r"layer 1, head 1: the MInference schema has no type for the modality "
                                         r"pattern 'grid'.*format='sparse_attn'"):
        cfg.to_json("minference")
