from kvcompress.testing import QuantizerConformance


class TestAbsmax(QuantizerConformance):
    spec = {"method": "absmax"}
    role = "values"
    head_dim = 64
    max_relative_error = 0.2


class TestAbsmax8Keys(QuantizerConformance):
    spec = {"method": "absmax", "bits": 8}
    role = "keys"
    head_dim = 32
    max_relative_error = 0.02
