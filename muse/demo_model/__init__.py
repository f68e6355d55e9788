"""The embedded default model: a small Stable Diffusion pipeline trained from scratch on shape scenes.

``pipeline/`` holds the weights (written by ``python -m muse.demo_model.train``); ``architecture``
builds random-weight pipelines of the same classes; ``scenes`` is the prompt grammar and the renderer
of training data; ``checker`` judges images from their pixels.
"""

from pathlib import Path

PIPELINE_FOLDER = Path(__file__).parent / "pipeline"
