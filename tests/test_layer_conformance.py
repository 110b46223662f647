"""Every letter of the layer spec meets `layer_conformance.LayerConformance` (issue 13 item 6,
NaN isolation: issue 17 item 11)."""

from layer_conformance import LayerConformance
from sparse_jax.models.lm import LAYER_TYPES


class TestFull(LayerConformance):
    spec = "F"


class TestSlidingWindow(LayerConformance):
    spec = "W"


class TestStreamingLLM(LayerConformance):
    spec = "S"


class TestPattern(LayerConformance):
    spec = "P"


class TestNSA(LayerConformance):
    spec = "N"


class TestHySparseFull(LayerConformance):
    spec = "H"


class TestHySparseSparse(LayerConformance):
    spec = "HY"


class TestMoBA(LayerConformance):
    spec = "M"


class TestMLA(LayerConformance):
    spec = "L"


class TestDSA(LayerConformance):
    spec = "D"


class TestCSA(LayerConformance):
    spec = "C"


class TestHCA(LayerConformance):
    spec = "R"


class TestEntmax(LayerConformance):
    spec = "E"


class TestASEntmax(LayerConformance):
    spec = "A"


def test_every_letter_has_a_conformance_class():
    covered = {cls.spec[-1] for cls in LayerConformance.__subclasses__()}
    assert covered == set(LAYER_TYPES), f"letters without a conformance class: {set(LAYER_TYPES) - covered}"
