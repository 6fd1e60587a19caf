//! Where the controller's configuration comes from: a watched directory of YAML files (the
//! local default) or the Kubernetes API. Sources report changes; the model never knows which
//! source an object came from.

pub mod dir;
pub mod dir_model;
pub mod kube;
