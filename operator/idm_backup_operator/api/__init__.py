"""The API as the code sees it: names, labels and annotations, phases, time format, and the typed specs.

The bottom layer: pure data and parsing, no Kubernetes client, no I/O. crds/ is the contract; these
modules give it names and types.
"""
