import pytest
from bundles import make_bundle

from ldm.formats.bundle import ModelBundle


@pytest.fixture(params=["sd1", "sd2"])
def bundle(request) -> ModelBundle:
    return make_bundle(request.param)
