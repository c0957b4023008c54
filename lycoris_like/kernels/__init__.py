"""Pure tensor math: no nn.Module, no state. Each function has a naive reference in the tests."""
