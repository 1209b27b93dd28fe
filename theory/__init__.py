"""fastdp.theory: the continuous-time analysis of Noisy-SGD (Sander et al., AISTATS 2024) as code.

Modules (flat, imported as ``fastdp.theory.<name>``):

- ``lls``: under-parameterised least squares, the OU model of (Noisy-)SGD, its stationary
  covariance (Lyapunov, closed form, exact discrete fixed point) and vectorised simulations.
- ``lls_overparam``: over-parameterised least squares, the minimum-norm interpolator and the
  Theorem 1 bound E||theta_t - beta_t||^2 <= gamma d sigma^2 int L checked by simulation.
- ``dln``: diagonal linear networks, the hyperbolic-entropy potential, mirror map, effective
  scales alpha_inf and the solver for argmin_{X beta = y} phi_alpha(beta).
- ``dln_sim``: GD, SGD, minibatch SGD and Noisy-SGD on DLNs, vectorised over seeds and sigmas.
- ``lls_report``, ``dln_report``, ``plots``, ``cli``: the ``fastdp theory lls|dln`` commands.

``theory/README.md`` states the models, the formulas as implemented and the numbers obtained.
"""
