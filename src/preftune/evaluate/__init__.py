"""Evaluation: checker pass rates of generations, preference accuracies."""
