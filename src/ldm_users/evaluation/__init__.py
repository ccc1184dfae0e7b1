"""Evaluation of trained models: a user classifier as judge, Fréchet distances, KID, diversity, memorisation."""
