// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {Pausable} from "@openzeppelin/contracts/utils/Pausable.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";

import {IGpgpuEscrow} from "./IGpgpuEscrow.sol";

/// @title GPGPU escrow
/// @notice See {IGpgpuEscrow} for the behaviour, the item encoding and the rules.
/// @dev Storage is laid out for the settlement hot path: one slot per job packs
/// {uint96 remaining reservation | uint64 current lease id | uint96 settled cumulative charge},
/// so an item costs one read and one write of its job plus its provider's credit (shared by
/// consecutive items of the same provider).
contract GpgpuEscrow is IGpgpuEscrow, AccessControl, Pausable, ReentrancyGuardTransient, EIP712 {
    using SafeERC20 for IERC20;

    bytes32 public constant OPERATOR_ROLE = keccak256("OPERATOR_ROLE");
    bytes32 public constant PAUSER_ROLE = keccak256("PAUSER_ROLE");
    bytes32 public constant BUDGET_TYPEHASH =
        keccak256("Budget(uint256 jobId,address renter,uint256 maxAmount,uint256 deadline)");

    /// @notice The platform fee can never exceed 20 %.
    uint256 public constant MAX_FEE_BPS = 2_000;
    uint256 private constant _BPS = 10_000;

    uint256 private constant _MASK_64 = type(uint64).max;
    uint256 private constant _MASK_96 = type(uint96).max;
    /// @dev Lease id stored in a released job's slot: every later item is skipped as `JobClosed`.
    uint256 private constant _CLOSED = type(uint64).max;

    struct JobOwner {
        address renter;
        uint64 deadline;
    }

    IERC20 private immutable _token;

    address private _treasury;
    uint16 private _feeBps;
    uint256 private _feesAccrued;

    mapping(address renter => uint256) private _available;
    mapping(address provider => uint256) private _earnings;
    /// @dev remaining (bits 0..95) | leaseId (bits 96..159) | settled cumulative charge (bits 160..255).
    /// Zero means "no budget": an active budget has a non-zero reservation or a non-zero lease id.
    mapping(uint256 jobId => uint256) private _jobState;
    mapping(uint256 jobId => JobOwner) private _jobOwner;

    /// @param token_ The ERC-20 held (a plain stablecoin; see {deposit}).
    /// @param admin Receives DEFAULT_ADMIN_ROLE and PAUSER_ROLE.
    /// @param treasury_ Where platform fees may be withdrawn to.
    /// @param feeBps_ Initial platform fee, at most MAX_FEE_BPS.
    constructor(IERC20 token_, address admin, address treasury_, uint256 feeBps_) EIP712("GpgpuEscrow", "1") {
        if (address(token_) == address(0) || admin == address(0) || treasury_ == address(0)) {
            revert GpgpuEscrow_ZeroAddress();
        }
        if (feeBps_ > MAX_FEE_BPS) revert GpgpuEscrow_FeeTooHigh(feeBps_, MAX_FEE_BPS);
        _token = token_;
        _treasury = treasury_;
        _feeBps = uint16(feeBps_);
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(PAUSER_ROLE, admin);
        emit TreasuryChanged(address(0), treasury_);
        emit FeeChanged(0, feeBps_);
    }

    // ---------------------------------------------------------------- renters

    /// @inheritdoc IGpgpuEscrow
    function deposit(uint256 amount) external whenNotPaused nonReentrant {
        // Checks
        if (amount == 0) revert GpgpuEscrow_ZeroAmount();
        // Effects
        _available[msg.sender] += amount;
        emit Deposited(msg.sender, amount);
        // Interactions
        _token.safeTransferFrom(msg.sender, address(this), amount);
    }

    /// @inheritdoc IGpgpuEscrow
    function withdraw(uint256 amount) external nonReentrant {
        // Checks
        if (amount == 0) revert GpgpuEscrow_ZeroAmount();
        uint256 available = _available[msg.sender];
        if (amount > available) revert GpgpuEscrow_InsufficientBalance(msg.sender, available, amount);
        // Effects
        unchecked {
            _available[msg.sender] = available - amount;
        }
        emit Withdrawn(msg.sender, amount);
        // Interactions
        _token.safeTransfer(msg.sender, amount);
    }

    /// @inheritdoc IGpgpuEscrow
    function releaseJob(uint256 jobId, uint256 leaseId, uint256 settledCharge) external {
        // Checks
        JobOwner memory owner = _jobOwner[jobId];
        if (owner.renter == address(0)) revert GpgpuEscrow_UnknownJob(jobId);
        uint256 state = _jobState[jobId];
        uint256 currentLease = (state >> 96) & _MASK_64;
        if (currentLease == _CLOSED) revert GpgpuEscrow_JobClosed(jobId);
        if (currentLease < leaseId || (currentLease == leaseId && state >> 160 < settledCharge)) {
            revert GpgpuEscrow_SettlementBehind(jobId, currentLease, state >> 160);
        }
        bool renterAfterDeadline = msg.sender == owner.renter && block.timestamp > owner.deadline;
        if (!renterAfterDeadline && !hasRole(OPERATOR_ROLE, msg.sender)) {
            revert GpgpuEscrow_ReleaseNotAllowed(jobId, owner.deadline);
        }
        // Effects
        uint256 refund = state & _MASK_96;
        _jobState[jobId] = (state >> 160 << 160) | (_CLOSED << 96);
        _available[owner.renter] += refund;
        emit JobReleased(jobId, owner.renter, refund);
    }

    // ---------------------------------------------------------------- operator

    /// @inheritdoc IGpgpuEscrow
    function reserve(BudgetAuthorization[] calldata budgets) external onlyRole(OPERATOR_ROLE) whenNotPaused {
        // Checks (each budget is checked, and skipped or activated, in _activateBudget)
        uint256 count = budgets.length;
        if (count == 0) revert GpgpuEscrow_NoBudgets();
        // Effects. There are no interactions.
        for (uint256 b; b < count; ++b) {
            _activateBudget(budgets[b]);
        }
    }

    /// @inheritdoc IGpgpuEscrow
    function settle(bytes32[] calldata items, BudgetAuthorization[] calldata budgets)
        external
        onlyRole(OPERATOR_ROLE)
        whenNotPaused
    {
        // Checks
        uint256 wordCount = items.length;
        if (wordCount & 1 != 0) revert GpgpuEscrow_MalformedItems(wordCount);

        // Effects. Budgets first: they reserve what the items below spend. There are no interactions.
        for (uint256 b; b < budgets.length; ++b) {
            _activateBudget(budgets[b]);
        }

        uint256 feeBps_ = _feeBps;
        uint256 paidTotal;
        uint256 feeTotal;
        address provider;
        uint256 credit;
        for (uint256 i; i < wordCount; i += 2) {
            uint256 word0 = uint256(items[i]);
            uint256 word1 = uint256(items[i + 1]);
            address itemProvider = address(uint160(word0 >> 96));
            uint256 cumulative = word0 & _MASK_96;
            uint256 jobId = word1 >> 64;
            uint256 leaseId = word1 & _MASK_64;
            if (itemProvider == address(0) || leaseId == 0 || leaseId == _CLOSED) {
                emit SettlementItemSkipped(jobId, leaseId, SkipReason.InvalidItem);
                continue;
            }

            uint256 state = _jobState[jobId];
            if (state == 0) {
                emit SettlementItemSkipped(jobId, leaseId, SkipReason.UnknownJob);
                continue;
            }
            uint256 currentLease = (state >> 96) & _MASK_64;
            if (leaseId < currentLease) {
                emit SettlementItemSkipped(
                    jobId, leaseId, currentLease == _CLOSED ? SkipReason.JobClosed : SkipReason.StaleLease
                );
                continue;
            }
            // A newer lease starts from nothing settled; the same lease continues where it stopped.
            uint256 settled = leaseId == currentLease ? state >> 160 : 0;
            if (cumulative <= settled) continue; // replayed or lower cumulative: nothing new to pay

            uint256 remaining = state & _MASK_96;
            uint256 pay;
            unchecked {
                pay = cumulative - settled;
                if (pay > remaining) {
                    emit ChargeCapped(jobId, leaseId, pay - remaining);
                    pay = remaining;
                }
                _jobState[jobId] = (cumulative << 160) | (leaseId << 96) | (remaining - pay);
            }
            if (pay == 0) continue;

            if (itemProvider != provider) {
                if (credit != 0) _credit(provider, credit);
                provider = itemProvider;
                credit = 0;
            }
            // Fee rounds down; the provider gets the rest, so the two sum exactly to `pay`.
            uint256 fee = pay * feeBps_ / _BPS;
            unchecked {
                // Bounded by the sum of uint96 reservations: cannot overflow.
                feeTotal += fee;
                paidTotal += pay;
                credit += pay - fee;
            }
        }
        if (credit != 0) _credit(provider, credit);
        if (feeTotal != 0) _feesAccrued += feeTotal;
        emit Settled(wordCount >> 1, paidTotal, feeTotal);
    }

    // ---------------------------------------------------------------- payees

    /// @inheritdoc IGpgpuEscrow
    function withdrawEarnings() external nonReentrant {
        // Checks
        uint256 amount = _earnings[msg.sender];
        if (amount == 0) revert GpgpuEscrow_NothingToWithdraw();
        // Effects
        _earnings[msg.sender] = 0;
        emit EarningsWithdrawn(msg.sender, amount);
        // Interactions
        _token.safeTransfer(msg.sender, amount);
    }

    /// @inheritdoc IGpgpuEscrow
    function withdrawFees() external nonReentrant {
        // Checks
        address treasury_ = _treasury;
        if (msg.sender != treasury_) revert GpgpuEscrow_NotTreasury(msg.sender);
        uint256 amount = _feesAccrued;
        if (amount == 0) revert GpgpuEscrow_NothingToWithdraw();
        // Effects
        _feesAccrued = 0;
        emit FeesWithdrawn(treasury_, amount);
        // Interactions
        _token.safeTransfer(treasury_, amount);
    }

    // ---------------------------------------------------------------- admin

    /// @inheritdoc IGpgpuEscrow
    function setFee(uint256 newFeeBps) external onlyRole(DEFAULT_ADMIN_ROLE) {
        // Checks
        if (newFeeBps > MAX_FEE_BPS) revert GpgpuEscrow_FeeTooHigh(newFeeBps, MAX_FEE_BPS);
        // Effects
        emit FeeChanged(_feeBps, newFeeBps);
        _feeBps = uint16(newFeeBps);
    }

    /// @inheritdoc IGpgpuEscrow
    function setTreasury(address newTreasury) external onlyRole(DEFAULT_ADMIN_ROLE) {
        // Checks
        if (newTreasury == address(0)) revert GpgpuEscrow_ZeroAddress();
        // Effects
        emit TreasuryChanged(_treasury, newTreasury);
        _treasury = newTreasury;
    }

    /// @inheritdoc IGpgpuEscrow
    function pause() external onlyRole(PAUSER_ROLE) {
        _pause();
    }

    /// @inheritdoc IGpgpuEscrow
    function unpause() external onlyRole(PAUSER_ROLE) {
        _unpause();
    }

    // ---------------------------------------------------------------- views

    /// @inheritdoc IGpgpuEscrow
    function token() external view returns (address) {
        return address(_token);
    }

    /// @inheritdoc IGpgpuEscrow
    function treasury() external view returns (address) {
        return _treasury;
    }

    /// @inheritdoc IGpgpuEscrow
    function feeBps() external view returns (uint256) {
        return _feeBps;
    }

    /// @inheritdoc IGpgpuEscrow
    function feesAccrued() external view returns (uint256) {
        return _feesAccrued;
    }

    /// @inheritdoc IGpgpuEscrow
    function availableBalance(address renter) external view returns (uint256) {
        return _available[renter];
    }

    /// @inheritdoc IGpgpuEscrow
    function earnings(address provider) external view returns (uint256) {
        return _earnings[provider];
    }

    /// @inheritdoc IGpgpuEscrow
    function job(uint256 jobId)
        external
        view
        returns (address renter, uint256 deadline, uint256 remaining, uint256 leaseId, uint256 settledCharge, bool closed)
    {
        JobOwner memory owner = _jobOwner[jobId];
        uint256 state = _jobState[jobId];
        leaseId = (state >> 96) & _MASK_64;
        closed = leaseId == _CLOSED;
        return (owner.renter, owner.deadline, state & _MASK_96, leaseId, state >> 160, closed);
    }

    /// @inheritdoc IGpgpuEscrow
    function budgetDigest(BudgetAuthorization calldata budget) external view returns (bytes32) {
        return _budgetDigest(budget);
    }

    // ---------------------------------------------------------------- internals

    /// @dev Activates `b`, or skips it with `BudgetSkipped` (moving nothing) when its job already has a
    /// budget (a replay), it expired, it is malformed, its signature is not its renter's, or the
    /// renter's available balance is short. Never reverts, so one budget cannot fail a batch.
    function _activateBudget(BudgetAuthorization calldata b) private {
        // Checks
        if (_jobOwner[b.jobId].renter != address(0)) {
            emit BudgetSkipped(b.jobId, b.renter, BudgetSkipReason.AlreadyKnown);
            return;
        }
        if (block.timestamp > b.deadline) {
            emit BudgetSkipped(b.jobId, b.renter, BudgetSkipReason.Expired);
            return;
        }
        // Items carry the job id in 192 bits and the reservation in 96.
        if (b.maxAmount == 0 || b.maxAmount > _MASK_96 || b.jobId > type(uint192).max) {
            emit BudgetSkipped(b.jobId, b.renter, BudgetSkipReason.InvalidBudget);
            return;
        }
        (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecoverCalldata(_budgetDigest(b), b.signature);
        if (err != ECDSA.RecoverError.NoError || signer != b.renter || signer == address(0)) {
            emit BudgetSkipped(b.jobId, b.renter, BudgetSkipReason.InvalidSignature);
            return;
        }
        uint256 available = _available[b.renter];
        if (available < b.maxAmount) {
            emit BudgetSkipped(b.jobId, b.renter, BudgetSkipReason.InsufficientBalance);
            return;
        }
        // Effects
        unchecked {
            _available[b.renter] = available - b.maxAmount;
        }
        uint64 deadline = b.deadline > _MASK_64 ? type(uint64).max : uint64(b.deadline);
        _jobOwner[b.jobId] = JobOwner({renter: b.renter, deadline: deadline});
        _jobState[b.jobId] = b.maxAmount;
        emit BudgetReserved(b.jobId, b.renter, b.maxAmount, b.deadline);
    }

    function _credit(address provider, uint256 amount) private {
        _earnings[provider] += amount;
        emit EarningsCredited(provider, amount);
    }

    function _budgetDigest(BudgetAuthorization calldata b) private view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(BUDGET_TYPEHASH, b.jobId, b.renter, b.maxAmount, b.deadline)));
    }
}
