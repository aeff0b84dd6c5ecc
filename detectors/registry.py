"""The detector configurations the service accepts, told apart by their ``kind``.

Adding a detector means adding its module (a pydantic config with ``kind`` and ``build(model)``)
and one entry here.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from detectors.adversarial import AdversarialConfig
from detectors.probing import ProbingConfig
from detectors.squeeze import SqueezeConfig
from detectors.uncertainty import UncertaintyConfig

DetectorConfig = Annotated[Union[ProbingConfig, UncertaintyConfig, SqueezeConfig, AdversarialConfig], Field(discriminator="kind")]
