"""The lab around the library: corpus and tokenizer, training, checkpoints, benchmarks, the quality study
and the ``ra`` command line. The library (``reciprocal_attention`` minus ``lab``) never imports it."""
