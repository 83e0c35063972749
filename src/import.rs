//! Weight import and export as safetensors state dicts, with PyTorch's names for
//! `torch.nn.RNN/LSTM/GRU` and the zoo-only cells, and the official names for `sru.SRU`.
//!
//! A user's file carries no config, so the caller builds the layer (its config says which cell,
//! how many layers, which directions) and the file fills in its parameters. Every tensor of the
//! file (under the optional key prefix) must be used, and every parameter must be found with
//! its exact shape; anything else is an [`ImportError`] naming the tensor.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use burn::tensor::TensorData;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};

/// Why a state dict could not be read, written or matched to a layer.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The bytes are not a valid safetensors file.
    #[error("not a valid safetensors file: {0}")]
    Format(String),
    /// A parameter the layer needs is not in the file.
    #[error("missing tensor '{0}'")]
    Missing(String),
    /// Tensors in the file that the layer has no parameter for.
    #[error("unexpected tensors: {}", .0.join(", "))]
    Unexpected(Vec<String>),
    /// A tensor has the wrong shape.
    #[error("tensor '{name}' has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The tensor.
        name: String,
        /// The shape the layer needs.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor is not a floating-point type we read.
    #[error("tensor '{name}' has dtype {dtype}, expected F32, F64, F16 or BF16")]
    Dtype {
        /// The tensor.
        name: String,
        /// Its dtype in the file.
        dtype: String,
    },
}

/// Something that hands out named tensors of a required shape.
pub trait TensorSource {
    /// The tensor `name` (relative to any prefix), checked against `shape`.
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<TensorData, ImportError>;
}

/// The tensors of a safetensors file held in memory (as f32), with the file's metadata.
#[derive(Debug, Clone)]
pub struct StateDict {
    tensors: BTreeMap<String, TensorData>,
    metadata: HashMap<String, String>,
    prefix: String,
    used: BTreeSet<String>,
}

impl StateDict {
    /// Parses safetensors bytes; only keys starting with `prefix` are visible (without it).
    pub fn from_bytes(bytes: &[u8], prefix: &str) -> Result<Self, ImportError> {
        let file =
            SafeTensors::deserialize(bytes).map_err(|e| ImportError::Format(e.to_string()))?;
        let (_, header) =
            SafeTensors::read_metadata(bytes).map_err(|e| ImportError::Format(e.to_string()))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in file.tensors() {
            if let Some(key) = name.strip_prefix(prefix) {
                tensors.insert(key.to_string(), to_f32(&name, &view)?);
            }
        }
        Ok(Self {
            tensors,
            metadata: header.metadata().clone().unwrap_or_default(),
            prefix: prefix.to_string(),
            used: BTreeSet::new(),
        })
    }

    /// A state dict over tensors already in memory (e.g. another layer's
    /// [`state_dict`](crate::layer::RnnLayer::state_dict)).
    pub fn from_tensors(tensors: Vec<(String, TensorData)>) -> Self {
        Self {
            tensors: tensors.into_iter().collect(),
            metadata: HashMap::new(),
            prefix: String::new(),
            used: BTreeSet::new(),
        }
    }

    /// Reads a safetensors file; see [`from_bytes`](StateDict::from_bytes).
    pub fn from_file(path: impl AsRef<Path>, prefix: &str) -> Result<Self, ImportError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| ImportError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(&bytes, prefix)
    }

    /// The file's `__metadata__` entries.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The shape of tensor `name` (without prefix), if the file has it.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|data| data.shape.to_vec())
    }

    /// Names (without prefix) not yet taken.
    pub fn unused(&self) -> Vec<String> {
        self.tensors
            .keys()
            .filter(|name| !self.used.contains(*name))
            .cloned()
            .collect()
    }

    /// Fails with [`ImportError::Unexpected`] if any tensor was not taken.
    pub fn ensure_all_used(&self) -> Result<(), ImportError> {
        let unused = self.unused();
        if unused.is_empty() {
            Ok(())
        } else {
            Err(ImportError::Unexpected(
                unused
                    .into_iter()
                    .map(|n| format!("{}{n}", self.prefix))
                    .collect(),
            ))
        }
    }
}

impl TensorSource for StateDict {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<TensorData, ImportError> {
        let full_name = format!("{}{name}", self.prefix);
        let data = self
            .tensors
            .get(name)
            .ok_or_else(|| ImportError::Missing(full_name.clone()))?;
        if data.shape.as_slice() != shape {
            return Err(ImportError::Shape {
                name: full_name,
                expected: shape.to_vec(),
                found: data.shape.to_vec(),
            });
        }
        self.used.insert(name.to_string());
        Ok(data.clone())
    }
}

fn to_f32(name: &str, view: &TensorView<'_>) -> Result<TensorData, ImportError> {
    let bytes = view.data();
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(ImportError::Dtype {
                name: name.to_string(),
                dtype: format!("{other:?}"),
            })
        }
    };
    Ok(TensorData::new(values, view.shape().to_vec()))
}

/// Serialises named f32 tensors (names get `prefix` in front) with optional metadata.
pub fn to_safetensors_bytes(
    tensors: &[(String, TensorData)],
    prefix: &str,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, ImportError> {
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, data)| {
            let values = data
                .clone()
                .convert::<f32>()
                .to_vec::<f32>()
                .expect("f32 data");
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (format!("{prefix}{name}"), data.shape.to_vec(), bytes)
        })
        .collect();
    let views = raw
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| ImportError::Format(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, &metadata).map_err(|e| ImportError::Format(e.to_string()))
}

/// Writes bytes to `path` atomically (a temporary file in the same folder, then a rename).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ImportError> {
    let io = |source| ImportError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}
