"""vaemo_dist: distributed pretraining of audio-visual emotion representations (VAEmo)."""

__version__ = "0.1.0"
