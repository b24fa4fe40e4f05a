"""The deployable packed format, beside the techniques rather than one of them: `bits` packs b-bit codes and
sparse masks into bytes, `layers` holds the packed Linear/Conv2d with their integer kernels, `embedding` the packed
embedding table, and `finalize` turns a model carrying the techniques' fake-quantizers, masks and smoothing into
those modules. Import the submodule you need; this package imports nothing, so `import techniques` stays light."""
