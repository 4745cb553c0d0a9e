"""The trainer: data, training loops, cost accounting and the `dataselect-train` CLI."""
