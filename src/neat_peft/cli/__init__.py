"""The `neat-peft` command line: train / eval / predict / merge / export-lora. Needs the [train] extra.

The core library never imports this package.
"""
