"""Corpora (fetch + load into a TextDataset) and federated partitioning (FederatedSplit)."""

from fedfm.data.fetch import bbc_dir, cache_dir, fetch_all, fetch_tweets, tweets_path
from fedfm.data.partition import FederatedSplit, split
from fedfm.data.sources import TextDataset, load_dataset, tweet_topic

__all__ = [
    "FederatedSplit",
    "TextDataset",
    "bbc_dir",
    "cache_dir",
    "fetch_all",
    "fetch_tweets",
    "load_dataset",
    "split",
    "tweet_topic",
    "tweets_path",
]
