//! The kernel programs that steer pod traffic into ztunnel, and their aya loader (to be built by
//! the L4-mesh issue). Knows nothing of xDS or Kubernetes. Today it holds nothing.
