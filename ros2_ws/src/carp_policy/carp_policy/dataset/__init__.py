"""Demonstration datasets in LeRobot's v3.0 layout: crash-safe writer, training reader, CLI.

    from carp_policy.dataset import DatasetWriter, EpisodeDataset, WindowDataset, split_episodes

No torch and no pandas here, so a recorder machine needs only numpy, pyarrow and PyAV.
"""

from .format import DatasetError, VideoConfig
from .reader import Episode, EpisodeDataset, KeyMap, MultiTaskEpisodes, WindowDataset, split_episodes
from .validate import validate_dataset
from .writer import DatasetWriter

__all__ = [
    "DatasetError",
    "DatasetWriter",
    "Episode",
    "EpisodeDataset",
    "KeyMap",
    "MultiTaskEpisodes",
    "VideoConfig",
    "WindowDataset",
    "split_episodes",
    "validate_dataset",
]
