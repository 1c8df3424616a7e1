"""An independent float64 NumPy reference for LoRA-Pro, straight from the paper.

Wang et al., "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", ICLR 2025.
Paper layout throughout: A is r×n, B is m×r, W = W0 + s·B·A, the full gradient
g is m×n, g_lora^A = s·Bᵀg (r×n) and g_lora^B = s·g·Aᵀ (m×r) (Eq. 5).

Deliberately different from `lorapro_jax.equations`: no damping (but see below), no scale
normalisation, explicit m×m / n×n projectors, the Sylvester equation solved by
its Kronecker (vec) form rather than by eigendecompositions, and plain Python
loops for the optimisers. Gram matrices are inverted with `np.linalg.inv`; only
an exactly singular Gram matrix (B = 0 at LoRA's initialisation, or a
rank-deficient factor) falls back to the pseudo-inverse, which is the δ → 0
limit of the package's damped inverse for consistent gradients (g_lora^A lies
in the range of Bᵀ). `damped_lorapro_gradients` is the one damped variant: the
package's relative damping G + δ·(tr G / r)·I, for testing that formula itself.
"""

from __future__ import annotations

import numpy as np


def _f64(*xs):
  return tuple(np.asarray(x, np.float64) for x in xs)


def gram_inv(G: np.ndarray) -> np.ndarray:
  """G⁻¹ for a symmetric PSD Gram matrix; the pseudo-inverse if G is singular."""
  G = np.asarray(G, np.float64)
  if np.linalg.matrix_rank(G) < G.shape[0]:
    return np.linalg.pinv(G)
  return np.linalg.inv(G)


def lora_gradients(g, A, B, s):
  """Eq. (5): g_lora^A = s·Bᵀg, g_lora^B = s·g·Aᵀ."""
  g, A, B = _f64(g, A, B)
  return s * B.T @ g, s * g @ A.T


def projectors(A, B):
  """P_B = B(BᵀB)⁻¹Bᵀ (m×m) and P_A = Aᵀ(AAᵀ)⁻¹A (n×n)."""
  A, B = _f64(A, B)
  return B @ gram_inv(B.T @ B) @ B.T, A.T @ gram_inv(A @ A.T) @ A


def projected_gradient(g, A, B):
  """The optimum of Theorem 2.1's objective: P_B·g + (I - P_B)·g·P_A."""
  (g,) = _f64(g)
  P_B, P_A = projectors(A, B)
  return P_B @ g + (np.eye(P_B.shape[0]) - P_B) @ g @ P_A


def equivalent_gradient(gA, gB, A, B, s):
  """Definition 1: g̃ = s·B·g^A + s·g^B·A."""
  gA, gB, A, B = _f64(gA, gB, A, B)
  return s * B @ gA + s * gB @ A


def adjust(gA_lora, gB_lora, A, B, s, X):
  """Theorem 2.1, Eq. (8) and (10), for a given r×r matrix X."""
  gA_lora, gB_lora, A, B, X = _f64(gA_lora, gB_lora, A, B, X)
  m = B.shape[0]
  BtB_inv = gram_inv(B.T @ B)
  AAt_inv = gram_inv(A @ A.T)
  P_B = B @ BtB_inv @ B.T
  gA = BtB_inv @ gA_lora / s**2 + X @ A
  gB = (np.eye(m) - P_B) @ gB_lora @ AAt_inv / s**2 - B @ X
  return gA, gB


def x_zero(A, B, s=None, gA_lora=None, gB_lora=None):
  r = np.shape(A)[0]
  return np.zeros((r, r))


def x_sylvester(gA_lora, A, B, s):
  """Theorem 2.3, Eq. (15): BᵀB·X + X·AAᵀ = -(1/s²)(BᵀB)⁻¹ g_lora^A Aᵀ.

  Solved through its vectorised form (column-major vec):
  (I ⊗ BᵀB + (AAᵀ)ᵀ ⊗ I) vec X = vec C.
  """
  gA_lora, A, B = _f64(gA_lora, A, B)
  r = A.shape[0]
  BtB, AAt = B.T @ B, A @ A.T
  C = -gram_inv(BtB) @ gA_lora @ A.T / s**2
  K = np.kron(np.eye(r), BtB) + np.kron(AAt.T, np.eye(r))
  x = np.linalg.solve(K, C.reshape(-1, order="F"))
  return x.reshape(r, r, order="F")


def x_symmetric(gB_lora, A, B, s):
  """Corrected Eq. (16): X = -(1/(2s²))(BᵀB)⁻¹ Bᵀ g_lora^B (AAᵀ)⁻¹ (r×r)."""
  gB_lora, A, B = _f64(gB_lora, A, B)
  return -gram_inv(B.T @ B) @ B.T @ gB_lora @ gram_inv(A @ A.T) / (2 * s**2)


def choose_x(x_choice, gA_lora, gB_lora, A, B, s):
  if x_choice == "zero":
    return x_zero(A, B)
  if x_choice == "sylvester":
    return x_sylvester(gA_lora, A, B, s)
  if x_choice == "symmetric":
    return x_symmetric(gB_lora, A, B, s)
  raise ValueError(x_choice)


def lorapro_gradients(gA_lora, gB_lora, A, B, s, x_choice="sylvester"):
  """Theorem 2.1 with the X of ``x_choice``: the adjusted (g^A, g^B)."""
  X = choose_x(x_choice, gA_lora, gB_lora, A, B, s)
  return adjust(gA_lora, gB_lora, A, B, s, X)


def damped_inv(G, damping):
  """(G + δ·(tr G / r)·I)⁻¹ by `np.linalg.inv`: the package's relative damping. A zero
  G gives zero, its pseudo-inverse (B = 0 at LoRA's initialisation)."""
  G = np.asarray(G, np.float64)
  r = G.shape[0]
  if np.trace(G) == 0:
    return np.zeros_like(G)
  return np.linalg.inv(G + damping * np.trace(G) / r * np.eye(r))


def damped_lorapro_gradients(gA_lora, gB_lora, A, B, s, x_choice, damping):
  """Theorem 2.1 with both Gram matrices damped, G → G + δ·(tr G / r)·I, as the package
  computes it (``damping`` = δ). Written from the equations, independently of the package:

    g^A = G_B⁻¹·g_lora^A / s² + X·A,
    g^B = (I - B·G_B⁻¹·Bᵀ)·g_lora^B·G_A⁻¹ / s² - B·X   (an explicit m×m matrix),

  with G_B = BᵀB and G_A = AAᵀ damped, and X from the damped Eq. (15),
  G_B·X + X·G_A = -G_B⁻¹·g_lora^A·Aᵀ / s² (Kronecker form), the damped corrected
  Eq. (16), X = -G_B⁻¹·Bᵀ·g_lora^B·G_A⁻¹ / (2s²), or zero.
  """
  gA_lora, gB_lora, A, B = _f64(gA_lora, gB_lora, A, B)
  r, m = A.shape[0], B.shape[0]
  G_A, G_B = A @ A.T, B.T @ B
  inv_A, inv_B = damped_inv(G_A, damping), damped_inv(G_B, damping)
  if x_choice == "zero":
    X = np.zeros((r, r))
  elif x_choice == "symmetric":
    X = -inv_B @ B.T @ gB_lora @ inv_A / (2 * s**2)
  elif x_choice == "sylvester":
    damp = lambda G: G + damping * np.trace(G) / r * np.eye(r)
    C = -inv_B @ gA_lora @ A.T / s**2
    K = np.kron(np.eye(r), damp(G_B)) + np.kron(damp(G_A).T, np.eye(r))
    X = np.linalg.solve(K, C.reshape(-1, order="F")).reshape(r, r, order="F")
  else:
    raise ValueError(x_choice)
  gA = inv_B @ gA_lora / s**2 + X @ A
  gB = (np.eye(m) - B @ inv_B @ B.T) @ gB_lora @ inv_A / s**2 - B @ X
  return gA, gB


def adam_direction(g, m, v, t, b1=0.9, b2=0.999, eps=1e-8):
  """Bias-corrected Adam: returns (m̂/(√v̂ + ε), m, v)."""
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g * g
  m_hat = m / (1 - b1**t)
  v_hat = v / (1 - b2**t)
  return m_hat / (np.sqrt(v_hat) + eps), m, v


def algorithm3_step(
  gA_lora, gB_lora, A, B, s, mom, vel, t, x_choice="sylvester", b1=0.9, b2=0.999, eps=1e-8
):
  """One step of Algorithm 3 (full mode), lines 5-18, at fixed (A, B).

  Returns the adjusted gradients (g̃^A, g̃^B) that the parameters are moved
  against (lines 23-24) and the new m×n moments.
  """
  A, B, mom, vel = _f64(A, B, mom, vel)
  gA, gB = adjust(gA_lora, gB_lora, A, B, s, x_zero(A, B))  # lines 5-7
  g_tilde = equivalent_gradient(gA, gB, A, B, s)  # line 8
  d, mom, vel = adam_direction(g_tilde, mom, vel, t, b1, b2, eps)  # lines 9-13
  pA, pB = _f64(s * B.T @ d, s * d @ A.T)  # lines 14-15, Eq. (56)
  gA, gB = lorapro_gradients(pA, pB, A, B, s, x_choice)  # lines 16-18
  return gA, gB, mom, vel


def algorithm3(
  A0, B0, full_grads, lrs, s, x_choice="sylvester", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0
):
  """Algorithm 3 (full mode) for one pair.

  Args:
    A0, B0: initial factors (paper layout).
    full_grads: callable ``(t, A, B) -> g`` (m×n full fine-tuning gradient at
      step t = 1, 2, ...; the LoRA gradients are derived from it by Eq. 5).
    lrs: learning rate γ_t of each step (its length is the number of steps).
    weight_decay: λ of Eq. (57)-(58).

  Returns:
    The list of (A_t, B_t) after each step.
  """
  A, B = _f64(A0, B0)
  m_, n_ = B.shape[0], A.shape[1]
  mom, vel = np.zeros((m_, n_)), np.zeros((m_, n_))
  out = []
  for t, lr in enumerate(lrs, start=1):
    gA_lora, gB_lora = lora_gradients(full_grads(t, A, B), A, B, s)
    gA, gB, mom, vel = algorithm3_step(
      gA_lora, gB_lora, A, B, s, mom, vel, t, x_choice, b1, b2, eps
    )
    decay = np.sqrt(1 - lr * weight_decay)  # lines 19-21
    A, B = decay * A - lr * gA, decay * B - lr * gB  # lines 22-23
    out.append((A.copy(), B.copy()))
  return out


def algorithm2(
  A0, B0, full_grads, lrs, s, x_choice="sylvester", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0
):
  """Algorithm 2 (efficient mode): Theorem 2.1, then AdamW on A and B separately.

  AdamW's decoupled decay P ← (1 - γλ)P is applied to both A and B (the printed
  algorithm shows it for A; optax.adamw and the official code decay both).
  """
  A, B = _f64(A0, B0)
  mA, vA = np.zeros_like(A), np.zeros_like(A)
  mB, vB = np.zeros_like(B), np.zeros_like(B)
  out = []
  for t, lr in enumerate(lrs, start=1):
    gA_lora, gB_lora = lora_gradients(full_grads(t, A, B), A, B, s)
    gA, gB = lorapro_gradients(gA_lora, gB_lora, A, B, s, x_choice)
    dA, mA, vA = adam_direction(gA, mA, vA, t, b1, b2, eps)
    dB, mB, vB = adam_direction(gB, mB, vB, t, b1, b2, eps)
    A = (1 - lr * weight_decay) * A - lr * dA
    B = (1 - lr * weight_decay) * B - lr * dB
    out.append((A.copy(), B.copy()))
  return out


def lstsq_equivalent_gradient(g, A, B, s):
  """Brute force for Theorem 2.1: min over (g^A, g^B) of ‖s·B·g^A + s·g^B·A - g‖_F.

  The map (g^A, g^B) ↦ s·B·g^A + s·g^B·A is linear; with column-major vec,
  vec(B·g^A) = (I_n ⊗ B) vec g^A and vec(g^B·A) = (Aᵀ ⊗ I_m) vec g^B. Returns
  the fitted m×n equivalent gradient (unique even though (g^A, g^B) is not).
  """
  g, A, B = _f64(g, A, B)
  m, n = g.shape
  M = s * np.concatenate([np.kron(np.eye(n), B), np.kron(A.T, np.eye(m))], axis=1)
  z, *_ = np.linalg.lstsq(M, g.reshape(-1, order="F"), rcond=None)
  return (M @ z).reshape(m, n, order="F")


def lstsq_x_closest(gA_lora, gB_lora, A, B, s):
  """Brute force for Theorem 2.3: the X minimising ‖g^A - g_lora^A‖² + ‖g^B - g_lora^B‖².

  With c_A, c_B the X = 0 solution, g^A = c_A + X·A and g^B = c_B - B·X, so the
  residual is linear in vec X: vec(X·A) = (Aᵀ ⊗ I_r) vec X, vec(B·X) = (I_r ⊗ B) vec X.
  """
  gA_lora, gB_lora, A, B = _f64(gA_lora, gB_lora, A, B)
  r = A.shape[0]
  cA, cB = adjust(gA_lora, gB_lora, A, B, s, np.zeros((r, r)))
  M = np.concatenate([np.kron(A.T, np.eye(r)), -np.kron(np.eye(r), B)], axis=0)
  rhs = np.concatenate(
    [(gA_lora - cA).reshape(-1, order="F"), (gB_lora - cB).reshape(-1, order="F")]
  )
  x, *_ = np.linalg.lstsq(M, rhs, rcond=None)
  return x.reshape(r, r, order="F")


def lstsq_x_balanced(gA_lora, gB_lora, A, B, s):
  """Brute force for the symmetric choice: the X minimising ‖g^B·A - B·g^A‖_F.

  g^B·A - B·g^A = (c_B·A - B·c_A) - 2·B·X·A, and vec(B·X·A) = (Aᵀ ⊗ B) vec X.
  """
  gA_lora, gB_lora, A, B = _f64(gA_lora, gB_lora, A, B)
  r = A.shape[0]
  cA, cB = adjust(gA_lora, gB_lora, A, B, s, np.zeros((r, r)))
  M = 2 * np.kron(A.T, B)
  x, *_ = np.linalg.lstsq(M, (cB @ A - B @ cA).reshape(-1, order="F"), rcond=None)
  return x.reshape(r, r, order="F")


def printed_eq16(g, A, B, s):
  """Eq. (16) as printed, with its evidently intended Aᵀ(AAᵀ)⁻¹A in place of
  the non-conforming A(AᵀA)⁻¹A: -(1/(2s))·B(BᵀB)⁻¹Bᵀ·g·Aᵀ(AAᵀ)⁻¹A, an m×n matrix.
  """
  (g,) = _f64(g)
  P_B, P_A = projectors(A, B)
  return -(P_B @ g @ P_A) / (2 * s)


# ------------------------------------------------------- factored mode, dense


def factored_step(
  gA_lora, gB_lora, A, B, s, M, R, C, t, x_choice="sylvester", b1=0.9, b2=0.999, eps=1e-8
):
  """One factored-mode step, dense, at fixed (A, B): Algorithm 3 with the
  first moment M re-projected onto the current span before it is updated,
  and Adafactor's factored second moment.

  * g̃ = s·B·g^A + s·g^B·A for Theorem 2.1's (g^A, g^B) at X = 0 (Eq. 55).
  * M ← β1·(P_B·M + (I - P_B)·M·P_A) + (1 - β1)·g̃ (Theorem 2.1's optimum
    with M as the full gradient: M's best approximation in the span).
  * R ← β2·R + (1 - β2)·(mean_j g̃_ij² + ε²), C ← β2·C + (1 - β2)·(mean_i g̃_ij² + ε²).
  * V̂ = R̂·Ĉᵀ / mean(R̂) with R̂ = R/(1 - β2ᵗ), Ĉ = C/(1 - β2ᵗ) (Adafactor).
  * D = (M / (1 - β1ᵗ)) ⊘ √V̂, then Eq. (56) and Theorem 2.1 with X.

  Returns (g̃^A, g̃^B, M, R, C) with M, R, C the new moments (m×n, m, n).
  """
  A, B, M, R, C = _f64(A, B, M, R, C)
  gA, gB = adjust(gA_lora, gB_lora, A, B, s, x_zero(A, B))
  g = equivalent_gradient(gA, gB, A, B, s)
  M = b1 * projected_gradient(M, A, B) + (1 - b1) * g
  R = b2 * R + (1 - b2) * (np.mean(g**2, axis=1) + eps**2)
  C = b2 * C + (1 - b2) * (np.mean(g**2, axis=0) + eps**2)
  R_hat, C_hat = R / (1 - b2**t), C / (1 - b2**t)
  V_hat = np.outer(R_hat, C_hat) / np.mean(R_hat)
  D = (M / (1 - b1**t)) / np.sqrt(V_hat)
  gA, gB = lorapro_gradients(s * B.T @ D, s * D @ A.T, A, B, s, x_choice)
  return gA, gB, M, R, C


def factored(
  A0, B0, full_grads, lrs, s, x_choice="sylvester", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0
):
  """Factored mode for one pair, dense, with Eq. (57)-(58) weight decay.

  Returns the list of (A_t, B_t, M_t, R_t, C_t) after each step.
  """
  A, B = _f64(A0, B0)
  m_, n_ = B.shape[0], A.shape[1]
  M, R, C = np.zeros((m_, n_)), np.zeros(m_), np.zeros(n_)
  out = []
  for t, lr in enumerate(lrs, start=1):
    gA_lora, gB_lora = lora_gradients(full_grads(t, A, B), A, B, s)
    gA, gB, M, R, C = factored_step(gA_lora, gB_lora, A, B, s, M, R, C, t, x_choice, b1, b2, eps)
    decay = np.sqrt(1 - lr * weight_decay)
    A, B = decay * A - lr * gA, decay * B - lr * gB
    out.append((A.copy(), B.copy(), M.copy(), R.copy(), C.copy()))
  return out
