"""Plain-PyTorch references (fp64-capable, CPU or GPU) that define the semantics every Triton kernel is tested
against: ``attention`` (attention with LSE, LSE merge), ``dca`` (dense DCA prefill and paged decode), ``estimate``
(vertical-slash estimation by full materialisation, the oracle of ``kernels/estimation.py``), ``sparse_index``
(work lists), ``masks`` (pattern masks), ``sparse_dca`` (sparse DCA with the kernel's tile semantics), and the
kernel twins ``vertical_slash`` and ``paged_attention``. The math both paths share (positions, regions, scales,
rotation) lives in ``kernels.dca_math``, not here."""
