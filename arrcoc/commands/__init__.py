"""The ``arrcoc`` subcommands that use the library (train, eval, adapt, sweep, visualize): each module has a
``main(argv)``; :mod:`arrcoc.cli` dispatches to them and to the benchmarks (:mod:`arrcoc.bench`)."""
