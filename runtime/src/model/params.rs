//! A model's parameters by name, in a fixed order: what the decoder and the vision encoder both
//! hold (Hugging Face names, the order an optimizer and a checkpoint use) and look up by name.
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// Named parameters in order, with an index by name.
pub struct NamedParams {
    list: Vec<(String, Tensor)>,
    index: HashMap<String, usize>,
}

impl NamedParams {
    pub fn new(list: Vec<(String, Tensor)>) -> NamedParams {
        let index = list
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        NamedParams { list, index }
    }

    /// Every parameter with its name, in order.
    pub fn named(&self) -> &[(String, Tensor)] {
        &self.list
    }

    /// Handles to every parameter (sharing storage), in order: what an optimizer is built over.
    pub fn handles(&self) -> Vec<Tensor> {
        self.list.iter().map(|(_, t)| t.shallow_clone()).collect()
    }

    /// The parameter with this name.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.index.get(name).map(|&i| &self.list[i].1)
    }

    /// The parameter with a name the model's own shapes define (a missing one is a bug).
    pub fn must(&self, name: &str) -> &Tensor {
        self.get(name)
            .unwrap_or_else(|| panic!("the model defines no parameter {name}"))
    }

    /// The parameter with a name the model's own shapes define, cast to `compute`.
    pub fn cast(&self, name: &str, compute: Kind) -> Tensor {
        self.must(name).to_kind(compute)
    }

    /// The device the parameters live on (the CPU for a model without parameters).
    pub fn device(&self) -> Device {
        self.list.first().map_or(Device::Cpu, |p| p.1.device())
    }
}
