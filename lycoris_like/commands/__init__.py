"""Subcommands of `lycoris-like`: each module has `register(subparsers)` adding its parser, whose
`func` default runs the command and returns the exit code."""
