"""Weights in and out of other frameworks. Each submodule needs its framework
installed and is imported explicitly, e.g. `import stackrnn.interop.torch`;
`import stackrnn` imports none of them."""
