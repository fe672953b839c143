"""clickrank: online click-probability prediction for recommender systems."""

__version__ = "0.1.0"
