//! Task heads applied to the equilibrium states.

pub mod classification;
pub mod segmentation;

pub use classification::ClassificationHead;
pub use segmentation::SegmentationHead;
